"""TensorRT (full TensorRT when importable, else TensorRT for RTX): adapter, runner, tap, engine runtime."""

from llm2trt.backends.base import Backend, lazy

BACKEND = Backend(
    "trt",
    runner=lazy("llm2trt.backends.tensorrt.runner:trt_runner"),
    tap=lazy("llm2trt.backends.tensorrt.tap:TrtTap"),
    decoder=lazy("llm2trt.backends.tensorrt.runtime:trt_decoder"),
    description="the built TensorRT engine (needs a GPU that runs it)",
)
