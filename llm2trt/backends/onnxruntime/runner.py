"""ONNX Runtime's runner: Polygraphy's OnnxrtRunner over the artifact's graph file, in llm2trt's
own session (`llm2trt.core.numerics.ort_session`): quantized graphs computed as they say, weight-only
layers in float rather than ONNX Runtime's default int8 activations."""

from __future__ import annotations

from polygraphy.backend.base import BaseRunner

from llm2trt.backends.base import RunnerContext

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}  # Polygraphy's short names


def ort_runner(ctx: RunnerContext, providers: list[str] | None = None) -> BaseRunner:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from llm2trt.core.numerics import ort_session

    names = [_PROVIDERS.get(p.lower(), p) for p in providers or ["cpu"]]
    path = ctx.onnx_path()
    return OnnxrtRunner(lambda: ort_session(path, names), name="ort")
