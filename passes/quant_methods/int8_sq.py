"""int8-sq: INT8 weights (per output channel) and activations (static per tensor), SmoothQuant."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.quant import QuantRequest
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_math import SQ_STRENGTHS, ActStats, clip_search, sq_search
from llm2trt.passes.quant_methods.method import MIN_CALIB_TOKENS, InputScale, QuantMethod


class Int8SmoothQuant(QuantMethod):
    """s = amax_x^a / amax_w^(1-a) moves activation outliers into the weights; a (unless --alpha
    fixes it), then the activation range's clip, are searched per group for the least W8A8 error on
    the calibration rows."""

    name = "int8-sq"
    weights = DType.INT8
    activations = DType.INT8
    smooth = True
    summary = "INT8 weights and activations, SmoothQuant"
    min_calib_tokens = MIN_CALIB_TOKENS
    tolerance = TolerancePolicy(name, 1.0, 0.9)

    def input_scale(
        self, stat: ActStats, weights: Sequence[np.ndarray], request: QuantRequest, block: int, *, foldable: bool
    ) -> InputScale:
        if not foldable:  # nothing migrates, but the static range's clip still matters
            return InputScale(clip=clip_search(stat.sample, stat.amax, weights, self))
        strengths = SQ_STRENGTHS if request.alpha is None else (request.alpha,)
        s, alpha, clip = sq_search(stat.sample, stat.amax, weights, self, strengths)
        return InputScale(s, alpha, clip)

    def fixed_alpha(self, request: QuantRequest) -> float | None:
        return request.alpha
