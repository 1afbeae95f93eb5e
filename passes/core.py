"""Pass infrastructure: passes return what they changed; a manager orders them and checks the graph.

A pass works on a `Model` (an onnx-graphsurgeon graph plus the node metadata onnx-graphsurgeon does
not carry) and returns a `PassResult` with per-rule counts. The manager checks ordering
constraints before it starts and the graph's invariants after every pass; a failed check names the
pass that broke it and the passes that ran before.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.errors import Llm2TrtError
from llm2trt.manifest import PassRecord

logger = logging.getLogger(__name__)

RULE_KEY = "llm2trt.rule"  # node metadata: the rewrite rule that made a node
_STASH_BYTES = 1024


def onnx_dtype(dtype: Any) -> int | None:
    """A tensor's element type as ONNX's enum: onnx-graphsurgeon holds a NumPy dtype, or the
    ONNX enum itself for types NumPy lacks (bfloat16, float8)."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def stash_weights(proto: onnx.ModelProto) -> dict[str, bytes]:
    """Take large initializers' bytes out while ONNX's C++ tools (shape inference, the version
    converter) serialize the model: they need only dims and types, and a model over 2 GB cannot be
    serialized. The tensors read as external meanwhile; `restore_weights` puts the bytes back by
    name, into this proto or into a converted copy of it.
    """
    stashed: dict[str, bytes] = {}
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= _STASH_BYTES:
            stashed[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "stashed-by-llm2trt"
    return stashed


def restore_weights(proto: onnx.ModelProto, stashed: dict[str, bytes]) -> None:
    for tensor in proto.graph.initializer:
        if tensor.name in stashed and tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = stashed[tensor.name]


@contextlib.contextmanager
def gs_quiet() -> Iterator[None]:
    """onnx-graphsurgeon logs to stdout; stdout belongs to --json."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # folding runs ONNX Runtime, whose notes are not ours
    old = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        yield
    finally:
        gs.logger.G_LOGGER.severity = old


class PassCheckError(Llm2TrtError):
    """A graph invariant broke after a pass: a bug in that pass, never user input."""


@dataclass
class Model:
    """The graph being rewritten, with the per-node metadata onnx-graphsurgeon drops."""

    graph: gs.Graph
    node_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    ir_version: int = 10

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto) -> Model:
        metadata = {n.name: {p.key: p.value for p in n.metadata_props} for n in proto.graph.node if n.metadata_props}
        with gs_quiet():
            return cls(gs.import_onnx(proto), metadata, proto.ir_version)

    def to_onnx(self) -> onnx.ModelProto:
        with gs_quiet():
            proto: onnx.ModelProto = gs.export_onnx(self.graph, do_type_check=False)
        # IR 10 is the first with node metadata (the rule tags).
        proto.ir_version = max(self.ir_version, 10)
        for node in proto.graph.node:
            for key, value in self.node_metadata.get(node.name, {}).items():
                entry = node.metadata_props.add()
                entry.key, entry.value = key, value
        return proto

    def tag(self, node: gs.Node, rule: str) -> None:
        self.node_metadata.setdefault(node.name, {})[RULE_KEY] = rule

    def rule_of(self, node: gs.Node) -> str | None:
        return self.node_metadata.get(node.name, {}).get(RULE_KEY)

    @property
    def opset(self) -> int:
        return int(self.graph.opset)


@dataclass
class PassResult:
    """What a pass did: `counts` per rule or per kind of change; `notes` explain refusals."""

    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class GraphPass(abc.ABC):
    """A transformation of a `Model` in place."""

    name: ClassVar[str]
    # Passes that must have run earlier in the same pipeline when both are present.
    runs_after: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def run(self, model: Model) -> PassResult: ...


GraphCheck = Callable[[Model], None]


def check_graph(model: Model) -> None:
    """Structural invariants every pass must keep: cheap enough to run after each pass."""
    graph = model.graph
    produced: set[str] = {t.name for t in graph.inputs}
    producers: dict[str, str] = {}
    for node in graph.nodes:
        for out in node.outputs:
            if out.name in producers:
                raise PassCheckError(
                    f"tensor {out.name!r} is produced by both {producers[out.name]!r} and {node.name!r}"
                )
            producers[out.name] = node.name
    try:
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    except Exception as exc:  # onnx-graphsurgeon raises a bare Exception on cycles
        raise PassCheckError(f"the graph has a cycle: {exc}") from None
    functions = {(f.domain, f.name) for f in graph.functions}
    for node in graph.nodes:
        for inp in node.inputs:
            if isinstance(inp, gs.Constant) or inp.is_empty() or inp.name in produced:
                continue
            raise PassCheckError(f"node {node.name!r} ({node.op}) reads {inp.name!r}, which nothing produces before it")
        produced.update(out.name for out in node.outputs)
        domain = node.domain or ""
        if (domain, node.op) in functions:
            continue
        if domain in ("", "ai.onnx") and not onnx.defs.has(node.op, model.opset):
            raise PassCheckError(f"node {node.name!r}: {node.op} is not an ONNX op at opset {model.opset}")
    for out in graph.outputs:
        if out.name not in produced and not isinstance(out, gs.Constant):
            raise PassCheckError(f"graph output {out.name!r} is not produced")


@dataclass
class PipelineResult:
    model: Model
    records: list[PassRecord]
    results: dict[str, PassResult]


class PassManager:
    """Runs passes in order, checks ordering constraints up front and the graph after each pass."""

    def __init__(
        self, passes: Sequence[GraphPass], checks: Sequence[GraphCheck] = (check_graph,), check_after_each: bool = True
    ) -> None:
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"a pass appears twice in {names}")
        for i, p in enumerate(passes):
            for before in p.runs_after:
                if before in names and names.index(before) > i:
                    raise ValueError(f"pass {p.name!r} must run after {before!r}")
        self.passes = list(passes)
        self.checks = list(checks)
        self.check_after_each = check_after_each

    def run(self, model: Model) -> PipelineResult:
        records: list[PassRecord] = []
        results: dict[str, PassResult] = {}
        for p in self.passes:
            start = time.perf_counter()
            with gs_quiet():  # onnx-graphsurgeon warns on stdout, which belongs to --json
                result = p.run(model)
            seconds = time.perf_counter() - start
            results[p.name] = result
            records.append(PassRecord(p.name, result.modified, dict(result.counts), round(seconds, 3)))
            counts = ", ".join(f"{k}={v}" for k, v in result.counts.items()) or "no change"
            logger.info("pass %-22s %s (%.1f s)", p.name, counts, seconds)
            if self.check_after_each or p is self.passes[-1]:
                self._check(model, [r.name for r in records])
        return PipelineResult(model, records, results)

    def _check(self, model: Model, ran: list[str]) -> None:
        for check in self.checks:
            try:
                check(model)
            except PassCheckError as exc:
                raise PassCheckError(
                    f"graph check failed after pass {ran[-1]!r} (passes run: {', '.join(ran)}): {exc}"
                ) from None
