"""Running a decoder engine: an executor for the decoder sessions (session.py) over TensorRT.

The engine has a prefill and a decode optimization profile (build.py): a step with one token per
row runs under the decode profile, anything longer under the prefill one. Buffers live on the GPU
as torch tensors; the session's feeds and results cross as NumPy arrays (simple, not fast: the
GPU-resident loop is ONNX Runtime's IO binding in bench_decode.py's terms).

TensorRT-RTX runs no engine without a GPU it supports, and it refuses sm90 (H100/H200: docs/facts.md,
"What runs where"). The code follows TensorRT 10's Python API (tensor names, `set_input_shape`,
`execute_async_v3`) and runs where such a GPU exists; elsewhere it refuses cleanly before touching CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llm2trt.backends.base import DecoderContext
from llm2trt.backends.decoder import DecoderSession, Executor, Feeds, open_session
from llm2trt.core.dtypes import DType, to_numpy, to_torch
from llm2trt.core.errors import BackendError
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.names import BUILD_NAME
from llm2trt.core.reports import BuildInfo


def engine_executor(artifact: Path, manifest: Manifest, graph: GraphSpec) -> tuple[Executor, bool]:
    """An executor over the directory's engine, and whether its prefill needs a dummy past slot."""
    from llm2trt.backends.tensorrt.adapter import engine_to_run

    backend, engine = engine_to_run(artifact, graph.engine, "generate from")
    info = BuildInfo.read(artifact / BUILD_NAME)
    runner = _EngineRunner(backend.module, engine.read_bytes(), info.profile_names)
    dummy = graph.kv_cache is not None and not graph.kv_cache.is_buffer
    return runner.run, dummy


class _EngineRunner:
    def __init__(self, trt: Any, plan: bytes, profile_names: list[str]) -> None:
        import torch

        self.torch = torch
        self.trt = trt
        logger = trt.Logger(trt.Logger.ERROR)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the engine (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.profiles = {name: i for i, name in enumerate(profile_names or ["all"])}
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]

    def _profile(self, feeds: Feeds) -> int:
        one_token = feeds["input_ids"].shape[1] == 1
        return self.profiles.get("decode" if one_token else "prefill", 0)

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        torch = self.torch
        self.context.set_optimization_profile_async(self._profile(feeds), self.stream.cuda_stream)
        keep = {}
        for name in self.inputs:
            tensor = to_torch(np.ascontiguousarray(feeds[name])).cuda()
            keep[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.names:
            if name in keep:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = DType.parse(self.engine.get_tensor_dtype(name)).torch
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT failed to execute the engine")
        self.stream.synchronize()
        return {name: to_numpy(t) for name, t in outputs.items()}


def trt_decoder(ctx: DecoderContext) -> DecoderSession:
    run, dummy_slot = engine_executor(ctx.artifact, ctx.manifest, ctx.graph)
    return open_session(
        ctx.graph, run, capacity=ctx.capacity, pad_id=ctx.pad_id, dummy_slot=dummy_slot, adapters=ctx.adapters
    )
