"""Run an ONNX graph in ONNX Runtime one segment at a time, handing out marked tensors as it goes.

The graph's nodes (topologically ordered) are cut after the last producer of each round of
marks. Each segment becomes a small model of its own (its nodes, the initializers they read,
still in the artifact's external data file); its inputs are the graph inputs and the earlier
segments' tensors it reads, its outputs the marks it produces and the tensors later segments
read. Between segments only that frontier is kept, so memory holds one segment's activations,
not every marked tensor of the graph; the graph still runs once in total.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from llm2trt.core.artifact import load_onnx
from llm2trt.core.dtypes import DType, numpy_of_onnx
from llm2trt.core.errors import BackendError, first_line
from llm2trt.core.numerics import ort_session

logger = logging.getLogger(__name__)

# The weights one segment of a streamed run holds at most: a 7B layer (about 400 MB in fp16) is cut
# in four, a layer and a half of the 1.1B shape make one; a larger single node (an embedding) is a
# segment alone. On the CPU an fp16 segment holds about three times its bytes (ONNX Runtime's float32
# copy of each weight beside it): 1.1B at 128 MiB peaked at 1.07 GB, at 256 MiB 1.39 GB (512 tokens).
SEGMENT_BYTES = 128 << 20


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads, outer-scope reads of its subgraphs (If, Loop) included."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names += _reads(inner)
    return names


class SegmentedGraph:
    """One graph, cut into segments that end at given node indices."""

    def __init__(self, proto: onnx.ModelProto, folder: Path, providers: Sequence[str]) -> None:
        self.proto = proto
        self.folder = folder
        self.providers = list(providers)
        self.nodes = list(proto.graph.node)
        self.initializers = {t.name: t for t in proto.graph.initializer}
        self.graph_outputs = [o.name for o in proto.graph.output]
        self._reads = [_reads(n) for n in self.nodes]
        self.last_read: dict[str, int] = {}
        for i, reads in enumerate(self._reads):
            for name in reads:
                self.last_read[name] = i

    def run(
        self, feeds: dict[str, np.ndarray], cuts: Sequence[tuple[int, list[str]]]
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield each cut's tensors (in the order asked) once its segment has run; `cuts` are
        (last node index, tensors that segment produces), with increasing indices."""
        values: dict[str, np.ndarray] = dict(feeds)
        start = 0
        for end, wanted in cuts:
            produced = self._run_segment(start, end, values, wanted)
            values.update(produced)
            for name in wanted:
                yield name, values[name]
            for name in [n for n in values if n not in feeds and self.last_read.get(n, -1) <= end]:
                del values[name]  # nothing later reads it: drop it
            start = end + 1

    def frontier(self, start: int, end: int, wanted: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
        """What nodes start..end (inclusive) need and leave: the tensors they read from before them
        (initializers aside), the tensors they make that are wanted, graph outputs or read after
        them, and the initializers they read."""
        made = {o for n in self.nodes[start : end + 1] for o in n.output if o}
        reads = dict.fromkeys(r for i in range(start, end + 1) for r in self._reads[i])
        inputs = [r for r in reads if r not in made and r not in self.initializers]
        outputs = [o for o in made if o in wanted or o in self.graph_outputs or self.last_read.get(o, -1) > end]
        return inputs, outputs, [r for r in reads if r in self.initializers]

    def _run_segment(
        self, start: int, end: int, values: dict[str, np.ndarray], wanted: list[str]
    ) -> dict[str, np.ndarray]:
        nodes = self.nodes[start : end + 1]
        inputs, outputs, initializers = self.frontier(start, end, wanted)
        model = self._model(nodes, inputs, outputs, values, initializers)
        session = self._session(model, start, end)
        try:
            results = session.run(outputs, {name: values[name] for name in inputs})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime failed on nodes {start}-{end}: {first_line(exc)}") from None
        return dict(zip(outputs, (np.asarray(r) for r in results), strict=True))

    def _model(
        self,
        nodes: list[onnx.NodeProto],
        inputs: list[str],
        outputs: list[str],
        values: dict[str, np.ndarray],
        initializers: list[str],
    ) -> onnx.ModelProto:
        typed = [value_info(name, values[name]) for name in inputs]
        return segment_model(self.proto, nodes, typed, outputs, [self.initializers[name] for name in initializers])

    def _session(self, model: onnx.ModelProto, start: int, end: int) -> Any:
        # The segment travels as bytes, its weights stay in the artifact's external data file. It
        # runs once, so no arena (measured on SmolLM2 at 4x512 beside the PyTorch reference:
        # 7.9 GB peak with arenas, 3.1 GB without).
        return ort_session(
            model.SerializeToString(),
            self.providers,
            what=f"nodes {start}-{end}",
            weights_folder=self.folder,
            arena=False,
            prepack=False,
        )


def weight_ops_late(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each one computed from weights alone (a DequantizeLinear of INT4
    codes, a tied embedding's Transpose) comes just before its first reader. A pass appends them
    where it likes, often all first: run in that order, a quantized 7B graph's dequantized weights
    were all alive at once between segments (22 GB)."""
    nodes = list(graph.node)
    weights = {t.name for t in graph.initializer}
    from_weights: set[str] = set()
    producer: dict[str, int] = {}
    deferred: set[int] = set()
    for i, node in enumerate(nodes):
        reads = _reads(node)
        if all(r in weights or r in from_weights for r in reads):
            deferred.add(i)
            from_weights.update(o for o in node.output if o)
            producer.update((o, i) for o in node.output if o)
    if not deferred:
        return
    order: list[onnx.NodeProto] = []
    placed: set[int] = set()

    def place(i: int) -> None:
        if i in placed:
            return
        placed.add(i)
        for name in _reads(nodes[i]):
            if name in producer:
                place(producer[name])
        order.append(nodes[i])

    for i in [*(i for i in range(len(nodes)) if i not in deferred), *sorted(deferred)]:
        place(i)  # the deferred ones left at the end: read by the graph's outputs alone
    del graph.node[:]
    graph.node.extend(order)


def initializer_bytes(tensor: onnx.TensorProto) -> int:
    """A weight's size without reading it: its external-data length, else its shape and type."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    try:
        itemsize = numpy_of_onnx(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # a type numpy has no name for: count it as 4 bytes
        itemsize = 4
    return int(math.prod(tensor.dims)) * itemsize


class StreamedGraph:
    """A graph file as an `Executor` (feeds by name -> graph outputs by name) that holds about one
    segment's weights at a time: its nodes are cut where a segment's weights would pass `budget`
    bytes, and each segment's session is made, run and dropped in turn, with only the tensors later
    segments read kept between them. A graph that fits one segment keeps its one session.

    `taps`: inner tensors handed to `sink` as they are made (calibration statistics), not kept. A
    feed named like a weight replaces that weight (the segments that read it take it as an input)."""

    def __init__(
        self,
        path: Path,
        providers: Sequence[str] | None = None,
        *,
        budget: int = SEGMENT_BYTES,
        taps: Sequence[str] = (),
        sink: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        proto = load_onnx(path, with_weights=False)  # a file that does not parse: one line
        weight_ops_late(proto.graph)
        self.path = path
        self.graph = SegmentedGraph(proto, path.parent, providers or ["CPUExecutionProvider"])
        self.taps, self.sink = list(taps), sink
        self.ends = self._cut(budget)
        made = {o for n in self.graph.nodes for o in n.output}
        missing = [t for t in self.taps if t not in made]
        if missing:
            raise BackendError(f"{path}: no node makes {', '.join(missing[:3])}")
        self._kept: tuple[tuple[str, ...], Any] | None = None
        starts = [0, *(end + 1 for end in self.ends[:-1])]
        taps_at = set(self.taps)  # each segment's taps, in the order its nodes make them
        self._wanted = [
            [o for n in self.graph.nodes[a : b + 1] for o in n.output if o in taps_at]
            for a, b in zip(starts, self.ends, strict=True)
        ]

    @property
    def segment_bytes(self) -> list[int]:
        """The weight bytes each segment's session loads."""
        inits, start, sizes = self.graph.initializers, 0, []
        for end in self.ends:
            read = {r for reads in self.graph._reads[start : end + 1] for r in reads if r in inits}
            sizes.append(sum(initializer_bytes(inits[r]) for r in read))
            start = end + 1
        return sizes

    def _cut(self, budget: int) -> list[int]:
        """Each segment's last node index: a new segment starts where the weights it would read
        (each counted once) pass the budget."""
        inits = self.graph.initializers
        ends: list[int] = []
        held, seen = 0, set[str]()
        for i, reads in enumerate(self.graph._reads):
            weights = {r for r in reads if r in inits}
            size = sum(initializer_bytes(inits[r]) for r in weights - seen)
            if seen and held + size > budget:
                ends.append(i - 1)
                held, seen = 0, set()
                size = sum(initializer_bytes(inits[r]) for r in weights)
            held += size
            seen |= weights
        if self.graph.nodes:
            ends.append(len(self.graph.nodes) - 1)
        return ends

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph, taps = self.graph, set(self.taps)
        values: dict[str, np.ndarray] = dict(feeds)
        for name in taps & set(feeds):
            self._tap(name, feeds[name])
        start = 0
        for end, wanted in zip(self.ends, self._wanted, strict=True):
            produced = self._run(start, end, values, wanted)
            for name in wanted:
                self._tap(name, produced[name])
            values.update(produced)
            for name in [n for n in values if n not in feeds and n not in graph.graph_outputs]:
                if graph.last_read.get(name, -1) <= end:
                    del values[name]  # nothing later reads it
            start = end + 1
        try:
            return {name: values[name] for name in graph.graph_outputs}
        except KeyError as exc:
            raise BackendError(f"{self.path}: the graph output {exc} was not made") from None

    def _tap(self, name: str, value: np.ndarray) -> None:
        if self.sink is not None:
            self.sink(name, value)

    def _run(self, start: int, end: int, values: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        graph = self.graph
        inputs, outputs, weights = graph.frontier(start, end, wanted)
        given = [w for w in weights if w in values]  # replaced weights come in as inputs
        inputs += given
        weights = [w for w in weights if w not in values]
        key = tuple(inputs)
        if self._kept is not None and self._kept[0] == key:
            session = self._kept[1]
        else:
            model = graph._model(graph.nodes[start : end + 1], inputs, outputs, values, weights)
            session = graph._session(model, start, end)
            if len(self.ends) == 1:
                self._kept = (key, session)
        logger.debug("%s: nodes %d-%d", self.path.name, start, end)
        try:
            results = session.run(outputs, {name: values[name] for name in inputs})
        except Exception as exc:  # onnxruntime raises its own exception types
            where = f"nodes {start}-{end} of {self.path}"
            raise BackendError(f"ONNX Runtime failed on {where}: {first_line(exc)}") from None
        return dict(zip(outputs, (np.asarray(r) for r in results), strict=True))


def segment_model(
    proto: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[str],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    """A model of some of `proto`'s nodes: the given inputs, outputs typed by ONNX Runtime, the
    initializers they read (still pointing at the artifact's external data)."""
    graph = onnx.helper.make_graph(
        nodes,
        f"{proto.graph.name}_segment",
        inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],  # ONNX Runtime infers their types
        initializer=initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    model.functions.extend(proto.functions)
    return model


def value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """A graph input typed like `value`, every dim dynamic."""
    return onnx.helper.make_tensor_value_info(name, DType.parse(value.dtype).onnx, [None] * value.ndim)
