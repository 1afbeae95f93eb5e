"""int4-gptq: INT4 weight-only blocks, GPTQ: input channels rounded in order, each one's error
compensated on the channels not yet rounded through the inverse Hessian of the layer's input."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_math import (
    GPTQ_DAMPENING,
    ActStats,
    dequantize_weight,
    fake_quant_weight,
    gptq_quantize,
    hessian_error,
)
from llm2trt.passes.quant_methods.method import MIN_CALIB_TOKENS, GroupCodes, QuantMethod


class Int4GPTQ(QuantMethod):
    """Plain GPTQ (no reordering, no migration): H = X^T X summed over every calibration token, damped
    by GPTQ_DAMPENING of its mean diagonal. The layers reading one input share H, so they are
    quantized as one weight (their output channels side by side): each output channel is its own
    problem, so that is the same result, with one factorization and one loop."""

    name = "int4-gptq"
    weights = DType.INT4
    blockwise = True
    needs_hessian = True
    dampening = GPTQ_DAMPENING
    summary = "INT4 weight-only blocks, GPTQ"
    min_calib_tokens = MIN_CALIB_TOKENS
    tolerance = TolerancePolicy(name, 1.0, 0.9)

    def quantize(self, weights: Sequence[np.ndarray], stat: ActStats | None, block: int) -> GroupCodes:
        if stat is None or stat.gram is None:
            raise ValueError(f"{self.name} needs the Gram matrix of each linear input from calibration")
        w = np.concatenate([np.asarray(x, np.float32) for x in weights], axis=1)
        codes, scales = gptq_quantize(w, stat.gram, block, self.dampening or GPTQ_DAMPENING)
        approx = dequantize_weight(codes, scales, self, block)
        rounding = hessian_error(w, fake_quant_weight(w, self, block), stat.gram)
        ratio = hessian_error(w, approx, stat.gram) / rounding if rounding > 0 else 1.0
        edges = np.cumsum([0, *(x.shape[1] for x in weights)])
        layers = [(codes[:, a:b], scales[:, a:b]) for a, b in pairwise(edges)]
        return GroupCodes(layers, round(ratio, 5))
