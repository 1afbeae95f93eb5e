"""Runtime backends (torch, onnxruntime, tensorrt): each package gives its runner, tap, decoder session
and rank executor; `llm2trt.backends.registry` registers each once."""
