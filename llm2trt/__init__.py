"""llm2trt: Hugging Face / PyTorch transformers to validated TensorRT engines through ONNX."""

__version__ = "0.1.0"
