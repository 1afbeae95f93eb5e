"""convert: a model source (Hugging Face directory or cache id, safetensors/.bin, GGUF, tiny:<arch>) to
an ONNX artifact. Kept import-free so that `llm2trt --help` does not load torch."""
