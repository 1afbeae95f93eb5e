"""PyTorch (transformers) as the reference backend: runner, tap and decoder."""

from llm2trt.backends.base import Backend, lazy

BACKEND = Backend(
    "torch",
    runner=lazy("llm2trt.backends.torch.runner:torch_runner"),
    tap=lazy("llm2trt.backends.torch.tap:TorchTap"),
    decoder=lazy("llm2trt.backends.torch.decoder:torch_decoder"),
    description="the source model in PyTorch (the reference)",
)
