"""What optimize and its per-rank split share: the numeric checks of a rewritten graph against its
input (whole-sequence, and token by token through the cache) and writing a graph with its description."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.core.artifact import op_counts, save_onnx
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import BackendError
from llm2trt.core.kv import SEQUENCE
from llm2trt.core.manifest import GraphSpec
from llm2trt.core.reports import NumericCheck
from llm2trt.core.tolerance import TolerancePolicy, errors
from llm2trt.exporters import ExportSpec
from llm2trt.passes.manager import Model, PassCheckError

if TYPE_CHECKING:
    from llm2trt.backends.decoder import DecoderSession

CHECK_BATCH, CHECK_SEQUENCE = 2, 16
# The token-by-token check of a KV rewrite: two prompts of different lengths, then a few tokens.
KV_CHECK_PROMPTS, KV_CHECK_STEPS = (7, 4), 3


def _verdict(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], policy: TolerancePolicy, batch: int, sequence: int
) -> NumericCheck:
    """Each (output, reference) pair's normwise error and cosine, held to the policy."""
    found = {name: errors(out, ref) if out.shape == ref.shape else None for name, (out, ref) in pairs.items()}
    rel = {name: e.max_rel_err if e else float("inf") for name, e in found.items()}
    cosine = {name: e.cosine if e else 0.0 for name, e in found.items()}
    passed = all(e is not None and policy.verdict(e.max_rel_err, e.max_abs_err, e.cosine) for e in found.values())
    return NumericCheck(
        True, None, policy.rtol, rel, passed, batch, sequence, cosine if policy.min_cosine else {}, policy.min_cosine
    )


def numeric_check(
    graph: GraphSpec, spec: ExportSpec, config: Any, before: Path, after: Path, policy: TolerancePolicy
) -> NumericCheck:
    """Run both graphs in ONNX Runtime on the same inputs, each a segment at a time (memory holds
    about one segment's weights, not the model's); the error per output and the verdict."""
    from llm2trt.backends.onnxruntime.segments import StreamedGraph

    sequence = CHECK_SEQUENCE
    if SEQUENCE in graph.dims:
        sequence = min(sequence, graph.dims[SEQUENCE].max)
    feeds = spec.sample_inputs(config, graph, CHECK_BATCH, sequence, seed=1)
    try:
        reference = StreamedGraph(before)(feeds)
    except BackendError as exc:
        return NumericCheck(False, f"the input graph does not run in ONNX Runtime here ({exc})")
    outputs = StreamedGraph(after)(feeds)
    return _verdict({name: (outputs[name], ref) for name, ref in reference.items()}, policy, CHECK_BATCH, sequence)


def kv_numeric_check(
    before: tuple[GraphSpec, Path], after: tuple[GraphSpec, Path], config: Any, policy: TolerancePolicy
) -> NumericCheck:
    """Run both graphs as decoders on the same prompts and tokens (prefill, then one token at a
    time through each graph's own cache); the logits of every step must agree."""
    probe = DecodeProbe.of(config)
    logits: list[list[np.ndarray]] = []
    for graph, path in (before, after):
        try:
            logits.append(probe.run_graph(graph, path))
        except BackendError as exc:
            if graph is before[0]:
                return NumericCheck(False, f"the input graph does not run in ONNX Runtime here ({exc})")
            raise
    return probe.verdict(logits[0], logits[1], policy)


@dataclass(frozen=True)
class DecodeProbe:
    """Prompts and tokens a decoder is run on to compare two ways of running it, step by step."""

    prompts: list[list[int]]
    tokens: np.ndarray  # (steps, rows)

    @classmethod
    def of(cls, config: Any) -> DecodeProbe:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, int(config.vocab_size), size=n).tolist() for n in KV_CHECK_PROMPTS]
        return cls(prompts, rng.integers(0, int(config.vocab_size), size=(KV_CHECK_STEPS, len(prompts))))

    @property
    def capacity(self) -> int:
        return max(len(p) for p in self.prompts) + len(self.tokens)

    def run(self, session: DecoderSession) -> list[np.ndarray]:
        """Logits of the prefill, then of each token fed."""
        return [session.prefill(self.prompts)] + [session.decode(t) for t in self.tokens]

    def run_graph(self, graph: GraphSpec, path: Path) -> list[np.ndarray]:
        """`run` on a graph file in ONNX Runtime (CPU), a segment at a time (`StreamedGraph`)."""
        from llm2trt.backends.decoder import open_session
        from llm2trt.backends.onnxruntime.segments import StreamedGraph

        return self.run(open_session(graph, StreamedGraph(path), capacity=self.capacity))

    def verdict(self, reference: list[np.ndarray], got: list[np.ndarray], policy: TolerancePolicy) -> NumericCheck:
        pairs = {f"logits step {i}": (a, b) for i, (b, a) in enumerate(zip(reference, got, strict=True))}
        return _verdict(pairs, policy, len(self.prompts), max(len(p) for p in self.prompts))


def save_graph(
    model: Model, graph: GraphSpec, path: Path, fusions: dict[str, int], expected: dict[str, int]
) -> GraphSpec:
    """Write a graph (weights in external data beside it) and describe what was written."""
    proto = model.to_onnx()
    written = save_onnx(proto, path.parent, path.name, source=model.weights_dir)
    # A pass may widen an output (ort_kernels: fp16 logits to float32); the description follows the graph.
    dtypes = {o.name: DType.find(o.type.tensor_type.elem_type) for o in proto.graph.output}
    outputs = [replace(t, dtype=dtypes.get(t.name) or t.dtype) for t in graph.outputs]
    return replace(
        graph,
        outputs=outputs,
        onnx=path.name,
        external_data=written.files,
        external_data_sha256=written.sha256,
        op_counts=op_counts(proto),
        fusions=fusions,
        expected_fusions=expected,
    )


def conform(model: Model, graph: GraphSpec) -> None:
    """Put the graph's inputs and outputs in the order its description lists them; a pass that left
    different names is a bug, caught here rather than by a runtime."""
    for kind, want in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        have = {t.name: t for t in getattr(model.graph, kind)}
        names = [t.name for t in want]
        if sorted(have) != sorted(names):
            raise PassCheckError(f"graph {kind} {sorted(have)} do not match graph {graph.name!r}: {names}")
        setattr(model.graph, kind, [have[name] for name in names])
