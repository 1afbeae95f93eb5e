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
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from llm2trt.core.artifact import external_info, point_external
from llm2trt.core.errors import Llm2TrtError
from llm2trt.core.log import still_running
from llm2trt.core.manifest import PassRecord
from llm2trt.core.reports import Refusal

logger = logging.getLogger(__name__)

RULE_KEY = "llm2trt.rule"  # node metadata: the rewrite rule that made a node
# Node metadata of an Attention whose mask input also carries a position bias (ALiBi): the bias
# tensor's name, so a pass that replaces the mask keeps the bias.
POSITION_BIAS_KEY = "llm2trt.position_bias"
_WEIGHT_ELEMENTS = 256


class FileValues(LazyValues):  # type: ignore[misc]  # onnx-graphsurgeon is untyped
    """A weight left in its artifact's data file: passes see its shape and dtype for free and read
    its bytes only if they ask (`Constant.values`); one they never read is cloned or copied file to
    file when the graph is saved, so rewriting a graph does not hold its weights in memory."""

    def __init__(self, tensor: onnx.TensorProto, directory: Path) -> None:
        super().__init__(tensor)
        info = external_info(tensor)
        self.path = directory / info["location"]
        self.offset, self.length = int(info.get("offset") or 0), int(info.get("length") or 0)

    def load(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            raw = fh.read(self.length) if self.length else fh.read()
        inline = onnx.TensorProto()
        inline.CopyFrom(self.tensor)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = raw
        return np.array(onnx.numpy_helper.to_array(inline))


class WeightSpill:
    """An append-only scratch file for the weights a pass makes (a rank's slices, quantized
    weights): they go to disk as they are made, and on to the artifact file to file at save."""

    SPILL_BYTES = 1 << 16  # smaller constants stay in memory

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def write(self, name: str, values: np.ndarray) -> FileValues:
        packed = onnx.numpy_helper.from_array(values, name)  # ONNX's packing (two INT4 a byte)
        raw = packed.raw_data
        pad = (-self.offset) % 4096
        with open(self.path, "ab") as fh:
            fh.write(b"\0" * pad + raw)
        self.offset += pad
        # A new message: clearing raw_data would leave the bytes in the message's arena.
        proto = onnx.TensorProto(name=name, data_type=packed.data_type, dims=packed.dims)
        del packed
        point_external(proto, str(self.path), self.offset, len(raw))
        self.offset += len(raw)
        return FileValues(proto, self.path.parent)


def _lazy_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Constants of the graph and its subgraphs whose values have not been read."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues:
            yield tensor
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Constant) and type(attr._values) is LazyValues:
                yield attr
            elif isinstance(attr, gs.Graph):
                yield from _lazy_constants(attr)


def read_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values; one on disk is read without being kept (`Constant.values` would keep it
    for the graph's lifetime: a pass reading every weight once would hold the whole model)."""
    if isinstance(tensor._values, FileValues):
        return tensor._values.load()
    return np.asarray(tensor.values)


def weight_bytes(tensor: gs.Constant) -> int:
    """A constant's size without reading it."""
    values = tensor._values
    if isinstance(values, LazyValues):
        return int(values.nbytes)
    return int(np.asarray(values).nbytes)


def weightless(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, gs.Constant]]:
    """The graph as ONNX with its large weights turned into typed graph inputs, and those weights.

    ONNX's C++ tools (shape inference, the version converter) need the weights' dims, not their
    bytes; exporting the bytes copies every weight (and cannot serialize past 2 GB).
    `reattach_weights` puts them back into a graph made from the result.
    """
    skeleton = graph.copy()  # copies nodes and tensors, not weight values
    weights: dict[str, gs.Constant] = {}
    for tensor in list(skeleton.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor.shape is None:
            continue
        if int(np.prod(tensor.shape)) < _WEIGHT_ELEMENTS:
            continue  # small constants stay: shape inference propagates their values
        stand_in = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
        for consumer in list(tensor.outputs):
            consumer.inputs[consumer.inputs.index(tensor)] = stand_in
        skeleton.inputs.append(stand_in)
        weights[tensor.name] = tensor
    with gs_quiet():
        proto: onnx.ModelProto = gs.export_onnx(skeleton, do_type_check=False)
    return proto, weights


def reattach_weights(graph: gs.Graph, weights: dict[str, gs.Constant]) -> None:
    """Replace the stand-in inputs `weightless` made with the weights themselves."""
    stand_ins = {t.name: t for t in graph.inputs if t.name in weights}
    for name, stand_in in stand_ins.items():
        for consumer in list(stand_in.outputs):
            consumer.inputs[consumer.inputs.index(stand_in)] = weights[name]
    graph.inputs = [t for t in graph.inputs if t.name not in stand_ins]


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
    # Where the weights the graph was loaded without live (their external-data directory).
    weights_dir: Path | None = None
    # Where passes put the large weights they make (None: in memory).
    spill: WeightSpill | None = None
    # Names taken in the graph, collected on first use; the pass manager drops it after every pass.
    _taken: set[str] | None = field(default=None, repr=False)

    def fresh_name(self, base: str) -> str:
        """A tensor/node name not used yet in the graph (and reserved from now on)."""
        if self._taken is None:
            self._taken = set(self.graph.tensors().keys()) | {n.name for n in self.graph.nodes}
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def constant(self, name: str, values: np.ndarray) -> gs.Constant:
        """A new constant named `name` (taken as is); a large one goes to the spill file if there is one."""
        values = np.ascontiguousarray(values)
        if self.spill is None or values.nbytes < WeightSpill.SPILL_BYTES:
            return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))
        return gs.Constant(name, self.spill.write(name, values))

    def forget_names(self) -> None:
        self._taken = None

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, weights_dir: Path | None = None) -> Model:
        """The graph of `proto`; with `weights_dir`, external weights stay on disk there (FileValues)."""
        metadata = {n.name: {p.key: p.value for p in n.metadata_props} for n in proto.graph.node if n.metadata_props}
        with gs_quiet():
            model = cls(gs.import_onnx(proto), metadata, proto.ir_version, weights_dir)
        if weights_dir is not None:
            for constant in _lazy_constants(model.graph):
                if constant._values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                    constant._values = FileValues(constant._values.tensor, weights_dir)
        return model

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
    """What a pass did: `counts` per rule or per kind of change; `refusals` say why a rule left a
    candidate alone; `notes` are anything else worth a line."""

    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


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
    _check_single_producers(graph)
    try:
        graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    except Exception as exc:  # onnx-graphsurgeon raises a bare Exception on cycles
        raise PassCheckError(f"the graph has a cycle: {exc}") from None
    functions = {(f.domain, f.name) for f in graph.functions}
    produced: set[str] = {t.name for t in graph.inputs}
    for node in graph.nodes:
        missing = [t.name for t in node.inputs if not _available(t, produced)]
        if missing:
            raise PassCheckError(
                f"node {node.name!r} ({node.op}) reads {missing[0]!r}, which nothing produces before it"
            )
        produced.update(out.name for out in node.outputs)
        domain = node.domain or ""
        standard = domain in ("", "ai.onnx") and (domain, node.op) not in functions
        if standard and not onnx.defs.has(node.op, model.opset):
            raise PassCheckError(f"node {node.name!r}: {node.op} is not an ONNX op at opset {model.opset}")
    for out in graph.outputs:
        if not _available(out, produced):
            raise PassCheckError(f"graph output {out.name!r} is not produced")


def _check_single_producers(graph: gs.Graph) -> None:
    producers: dict[str, str] = {}
    for node in graph.nodes:
        for out in node.outputs:
            if out.is_empty():  # an optional output left out
                continue
            if out.name in producers:
                raise PassCheckError(
                    f"tensor {out.name!r} is produced by both {producers[out.name]!r} and {node.name!r}"
                )
            producers[out.name] = node.name


def _available(tensor: gs.Tensor, produced: set[str]) -> bool:
    return isinstance(tensor, gs.Constant) or tensor.is_empty() or tensor.name in produced


@dataclass
class PipelineResult:
    model: Model
    passes: list[GraphPass]
    records: list[PassRecord]
    results: dict[str, PassResult]


STILL_RUNNING_SECONDS = 30.0


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
            # A pass logs its line when it ends; one searching for minutes (AWQ) is not silent meanwhile.
            with gs_quiet(), still_running(f"pass {p.name}", STILL_RUNNING_SECONDS):
                result = p.run(model)
            model.forget_names()
            seconds = time.perf_counter() - start
            results[p.name] = result
            records.append(PassRecord(p.name, result.modified, dict(result.counts), round(seconds, 3)))
            counts = ", ".join(f"{k}={v}" for k, v in result.counts.items()) or "no change"
            logger.info("pass %-22s %s (%.1f s)", p.name, counts, seconds)
            if self.check_after_each or p is self.passes[-1]:
                self._check(model, [r.name for r in records])
        return PipelineResult(model, list(self.passes), records, results)

    def _check(self, model: Model, ran: list[str]) -> None:
        for check in self.checks:
            try:
                check(model)
            except PassCheckError as exc:
                raise PassCheckError(
                    f"graph check failed after pass {ran[-1]!r} (passes run: {', '.join(ran)}): {exc}"
                ) from None
