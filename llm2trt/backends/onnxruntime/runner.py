"""ONNX Runtime's runner: Polygraphy's OnnxrtRunner over the artifact's graph file."""

from __future__ import annotations

from polygraphy.backend.base import BaseRunner

from llm2trt.backends.base import RunnerContext


def ort_runner(ctx: RunnerContext, providers: list[str] | None = None) -> BaseRunner:
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    onnxruntime.set_default_logger_severity(3)  # its notes (TensorScatter copying a buffer) are not ours
    return OnnxrtRunner(SessionFromOnnx(str(ctx.onnx_path()), providers=providers or ["cpu"]), name="ort")
