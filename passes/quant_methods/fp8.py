"""fp8: FP8 E4M3 weights (per output channel) and activations (static per tensor), amax scales."""

from __future__ import annotations

from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_methods.method import MIN_CALIB_TOKENS, QuantMethod


class Fp8Amax(QuantMethod):
    """Scales from max|w| and the calibrated max|x|: E4M3's range needs no search."""

    name = "fp8"
    weights = DType.FP8
    activations = DType.FP8
    summary = "FP8 E4M3 weights and activations, amax scales"
    min_calib_tokens = MIN_CALIB_TOKENS
    tolerance = TolerancePolicy(name, 1.0, 0.9)
