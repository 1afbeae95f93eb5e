"""ONNX Runtime's tap: the graph runs in segments, one per layer's marks (`segments.SegmentedGraph`);
a segment runs when the comparison first asks for one of its tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm2trt.backends.base import Mark, RunnerContext, Stream, Tap, rounds_of


class OrtTap(Tap):
    def __init__(self, ctx: RunnerContext, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnx

        from llm2trt.backends.onnxruntime.segments import SegmentedGraph

        path = ctx.onnx_path()
        self._graph = SegmentedGraph(onnx.load(str(path), load_external_data=False), path.parent, providers)
        self.segments = 0

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        inner = [m for m in marks if not m.graph_output]
        cuts = [(max(m.index for m in group), [m.tensor for m in group]) for group in rounds_of(inner)]
        for output in (m for m in marks if m.graph_output):
            at = next((i for i, (end, _) in enumerate(cuts) if end >= output.index), None)
            if at is None:
                cuts.append((output.index, [output.tensor]))
            else:
                cuts[at][1].append(output.tensor)
        self.segments = len(cuts)
        for name, value in self._graph.run(feeds, cuts):
            yield name, [value]
