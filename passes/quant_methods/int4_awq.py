"""int4-awq: INT4 weight-only blocks with AWQ's scales: a per-input-channel migration and a
per-block clipping ratio, both searched on calibration rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.quant import QuantRequest
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_math import ActStats, awq_clip, awq_scale
from llm2trt.passes.quant_methods.method import MIN_CALIB_TOKENS, InputScale, QuantMethod


class Int4AWQ(QuantMethod):
    """s = mean|x|^a with a on a grid minimising the layers' output error after INT4 rounding (a = 0
    is plain rounding), then each block's clip of its amax searched the same way."""

    name = "int4-awq"
    weights = DType.INT4
    blockwise = True
    smooth = True
    summary = "INT4 weight-only blocks, AWQ scales"
    min_calib_tokens = MIN_CALIB_TOKENS
    tolerance = TolerancePolicy(name, 1.0, 0.9)

    def input_scale(
        self, stat: ActStats, weights: Sequence[np.ndarray], request: QuantRequest, block: int, *, foldable: bool
    ) -> InputScale:
        if not foldable:  # weight-only: no activation range to clip either
            return InputScale()
        s, alpha, ratio = awq_scale(stat.sample, stat.mean_abs, weights, self, block)
        return InputScale(s, alpha, note=f"a={alpha:.2f}, loss {ratio:.3f} of rounding")

    def weight_clip(self, w: np.ndarray, stat: ActStats | None, s: np.ndarray | None, block: int) -> np.ndarray | None:
        if stat is None:
            raise ValueError(f"{self.name} searches its clipping on calibration rows")
        # After every fold: the weight as it will be quantized, and the rows it will see.
        scale = s if s is not None else np.ones(w.shape[0], np.float32)
        return awq_clip(stat.sample / scale, w, self, block)
