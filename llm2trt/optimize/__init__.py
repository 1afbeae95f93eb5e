"""optimize: the pass pipeline over an artifact's graphs, its numeric check, the per-rank split and
calibration for quantization."""
