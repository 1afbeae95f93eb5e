"""ONNX Runtime as a decoder: an executor over a graph file for the decoder sessions, and on the CUDA
provider with a buffer cache the GPU-resident session whose decode step is a CUDA graph."""

from __future__ import annotations

import numpy as np

from llm2trt.backends.base import DecoderContext
from llm2trt.backends.decoder import DecoderSession, Executor, Feeds, open_session
from llm2trt.core.errors import InputError


def ort_executor(path: str, providers: list[str] | None = None) -> Executor:
    """ONNX Runtime running a graph file: feeds by name, every output back by name."""
    from llm2trt.core.numerics import ort_session

    session = ort_session(path, providers)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(names, outputs, strict=True))

    return run


def ort_decoder(ctx: DecoderContext) -> DecoderSession:
    path = ctx.manifest.onnx_path(ctx.artifact, ctx.graph.name)
    kv = ctx.graph.kv_cache
    if "CUDAExecutionProvider" in ctx.providers and kv is not None and kv.traits.cuda_session:
        from llm2trt.backends.onnxruntime.cuda import (
            OrtCudaSession,  # GPU-resident buffers, the decode step as a CUDA graph
        )

        if ctx.graph.lora is not None:
            raise InputError(
                "the GPU-resident CUDA session does not take LoRA slots yet; run the graph on the CPU provider"
            )
        return OrtCudaSession(ctx.graph, str(path), ctx.capacity, ctx.pad_id)
    return open_session(
        ctx.graph,
        ort_executor(str(path), ctx.providers),
        capacity=ctx.capacity,
        pad_id=ctx.pad_id,
        adapters=ctx.adapters,
    )
