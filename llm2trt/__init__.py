"""llm2trt: Hugging Face / PyTorch transformers to validated TensorRT engines through ONNX."""

import os

# ONNX Runtime (1.32+ on Linux) otherwise starts telemetry when it is imported: a device id under
# ~/.cache/Microsoft, a session file in $TMPDIR and uploads. llm2trt writes only where it is told
# and never reaches for a network; this must be set before onnxruntime loads, and child processes
# (the build worker, the rank harness) inherit it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
