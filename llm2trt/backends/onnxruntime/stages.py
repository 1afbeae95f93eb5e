"""Pipeline stages in the rank harness: each stage's process runs its graph as a decoder session, the
activations going from each stage to the next by torch.distributed point-to-point send/recv.

Every stage runs the same decoding loop (prefill, then one token a step) on its own graph and its
own cache (its layers'). In each step stage s receives the activations from stage s-1 (shaped as
the step's tokens: [batch, sequence, hidden]), runs its graph, and sends its activations on to
stage s+1. The last stage's logits are then broadcast to every stage, so each picks the same
tokens, as tensor-parallel ranks do after their all-gather. The stages run one after another within
a step (no micro-batches): this is the layers split over processes, not yet a pipelined schedule.

Tensors cross as bytes of their own type (bf16 too), on the host with gloo, on the GPU with NCCL.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from llm2trt.backends.decoder import DecoderSession, Executor, Feeds, open_session
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import BackendError
from llm2trt.core.kv import BATCH, SEQUENCE
from llm2trt.core.manifest import GraphSpec, TensorSpec
from llm2trt.core.pp import PipelineParallel, is_activation

IDS, LOGITS = "input_ids", "logits"
# The logits' header: batch, sequence, vocabulary, and the index of their type in `_LOGIT_TYPES`.
_LOGIT_TYPES = (DType.FP32, DType.FP16, DType.BF16)


class Wire(Protocol):
    """What a stage needs of the harness's collectives (`ranks.Collectives`)."""

    @property
    def torch(self) -> Any: ...

    @property
    def dist(self) -> Any: ...

    @property
    def device(self) -> str: ...

    @property
    def backend(self) -> str: ...


class StageExecutor:
    """One stage's graph as an `Executor` for a decoder session: the activations received before it
    runs and sent after, the last stage's logits handed to every stage."""

    def __init__(self, run: Executor, graph: GraphSpec, record: PipelineParallel, wire: Wire) -> None:
        if record.stage is None:
            raise BackendError("a stage's manifest must say which stage it is")
        self.run, self.graph, self.wire = run, graph, wire
        self.stage, self.last = record.stage, record.pp - 1
        self.inputs = {t.name for t in graph.inputs}
        self.receives = [t for t in graph.inputs if is_activation(t.name)]
        self.sends = [t.name for t in graph.outputs if is_activation(t.name, out=True)]

    def __call__(self, feeds: Feeds) -> dict[str, Any]:
        batch, sequence = np.shape(feeds[IDS])
        values: dict[str, Any] = {k: v for k, v in feeds.items() if k in self.inputs}
        for spec in self.receives:
            values[spec.name] = self._recv((batch, sequence, int(spec.shape[-1])), spec.dtype, self.stage - 1)
        out = self.run(values)
        for name in self.sends:
            self._send(_host(out[name]), self.stage + 1)
        result = {k: v for k, v in out.items() if not is_activation(k, out=True)}
        result[LOGITS] = self._logits(result.get(self.graph.main_output))
        return result

    def _logits(self, logits: Any) -> np.ndarray:
        """The last stage's logits, on every stage."""
        torch, dist = self.wire.torch, self.wire.dist
        header = torch.zeros(4, dtype=torch.int64)
        if self.stage == self.last:
            logits = _host(logits)
            header = torch.tensor([*logits.shape, _LOGIT_TYPES.index(DType.parse(logits.dtype))], dtype=torch.int64)
        header = self._wire(header)
        dist.broadcast(header, src=self.last)
        batch, sequence, vocab, kind = (int(v) for v in header.cpu().tolist())
        dtype = _LOGIT_TYPES[kind]
        if self.stage == self.last:
            data = self._wire(_bytes(logits))
        else:
            data = self._wire(torch.empty(batch * sequence * vocab * dtype.numpy.itemsize, dtype=torch.uint8))
        dist.broadcast(data, src=self.last)
        return _array(data, dtype, (batch, sequence, vocab))

    def _send(self, value: np.ndarray, dst: int) -> None:
        self.wire.dist.send(self._wire(_bytes(value)), dst=dst)

    def _recv(self, shape: tuple[int, int, int], dtype: DType, src: int) -> np.ndarray:
        torch = self.wire.torch
        data = self._wire(torch.empty(int(np.prod(shape)) * dtype.numpy.itemsize, dtype=torch.uint8))
        self.wire.dist.recv(data, src=src)
        return _array(data, dtype, shape)

    def _wire(self, tensor: Any) -> Any:
        """Where the backend sends from: the host for gloo, this stage's GPU for NCCL."""
        return tensor.to(self.wire.device) if self.wire.backend == "nccl" else tensor


def _host(value: Any) -> np.ndarray:
    """A numpy array of an output (numpy, a torch tensor, or an ONNX Runtime OrtValue)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return np.asarray(value.detach().cpu().numpy())
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    raise BackendError(f"a stage's output is not an array but {type(value).__name__}")


def _bytes(value: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())


def _array(data: Any, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(data.cpu().numpy()).view(dtype.numpy).reshape(shape)


def session_graph(graph: GraphSpec) -> GraphSpec:
    """What a stage's decoder session sees: the model's token inputs and the logits (which every
    stage gets), the stage's cache; the activations are the executor's business."""
    inputs = [t for t in graph.inputs if not is_activation(t.name)]
    if all(t.name != IDS for t in inputs):
        inputs.insert(0, TensorSpec(IDS, DType.INT64, [BATCH, SEQUENCE]))
    outputs = [t for t in graph.outputs if not is_activation(t.name, out=True) and t.name != LOGITS]
    logits = next((t for t in graph.outputs if t.name == LOGITS), None)
    outputs.insert(0, logits or TensorSpec(LOGITS, DType.FP32, [BATCH, SEQUENCE, "vocab"]))
    return replace(graph, inputs=inputs, outputs=outputs, main_output=LOGITS)


def stage_session(
    graph: GraphSpec, run: Executor, record: PipelineParallel, wire: Wire, capacity: int, pad_id: int = 0
) -> DecoderSession:
    """A decoder session over one stage's graph, the stages together computing the model."""
    return open_session(session_graph(graph), StageExecutor(run, graph, record, wire), capacity=capacity, pad_id=pad_id)
