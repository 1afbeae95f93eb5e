"""ONNX Runtime (CPU and CUDA): runner, tap, decoder executors, the CUDA-graph session, the rank harness."""

from llm2trt.backends.base import Backend, lazy

BACKEND = Backend(
    "ort",
    runner=lazy("llm2trt.backends.onnxruntime.runner:ort_runner"),
    tap=lazy("llm2trt.backends.onnxruntime.tap:OrtTap"),
    decoder=lazy("llm2trt.backends.onnxruntime.decoder:ort_decoder"),
    ranks=lazy("llm2trt.backends.onnxruntime.ranks:run_ranks"),
    description="ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)",
)
