"""Tolerance profiles: how far a compared tensor may be from its reference, by numeric mode.

A mode is a float dtype (fp32, fp16, bf16) or a quantized mode (int8-sq, fp8, int4-awq, ...).
Float modes bound the normwise relative error only and are registered here; quantized modes move
every activation a little, so they allow a larger relative error and also require the direction
to hold (cosine similarity). Each quantization method carries its own profile and registers it
with itself (`llm2trt.passes.quant_methods`); `register_profile(..., replace=True)` overrides one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.records import Record
from llm2trt.core.registry import Registry


@dataclass(frozen=True)
class TolerancePolicy(Record):
    mode: str
    rtol: float  # normwise: max|out - ref| / max|ref|
    min_cosine: float | None = None  # cosine similarity of out and ref (flattened), when checked

    def with_rtol(self, rtol: float | None) -> TolerancePolicy:
        return self if rtol is None else TolerancePolicy(self.mode, rtol, self.min_cosine)

    def verdict(self, max_rel_err: float, max_abs_err: float, cosine: float, atol: float | None = None) -> bool:
        """Within tolerance: `atol`, when given, bounds the absolute error instead of rtol."""
        close = max_abs_err <= atol if atol is not None else max_rel_err <= self.rtol
        return bool(close and (self.min_cosine is None or cosine >= self.min_cosine))


PROFILES: Registry[TolerancePolicy] = Registry("tolerance profile")


def register_profile(policy: TolerancePolicy, *, replace: bool = False) -> TolerancePolicy:
    return PROFILES.register(policy.mode, policy, replace=replace)


for _dtype in (DType.FP32, DType.FP16, DType.BF16):
    register_profile(TolerancePolicy(_dtype.value, _dtype.tolerance.compare))


def profile_for(dtype: DType, quant: str | None = None) -> TolerancePolicy:
    """The profile of a quantized mode when the artifact has one, else of its dtype (a quantized
    mode's is there once `llm2trt.passes.quant_methods` is imported, as the passes do)."""
    return PROFILES.get(quant or dtype.value)


@dataclass(frozen=True)
class Errors:
    """How one tensor differs from its reference."""

    max_abs_err: float
    max_rel_err: float  # normwise
    elementwise_max_rel_err: float
    cosine: float
    scale: float = 0.0  # max|reference|


_CHUNK = 1 << 20  # elements per step: float64 temporaries stay at a few MB even for logits


def errors(value: np.ndarray, reference: np.ndarray) -> Errors:
    """Errors of `value` against `reference` (same number of elements; compared flattened), in
    float64, a chunk at a time."""
    a, b = np.ravel(value), np.ravel(reference)
    if a.size == 0:
        return Errors(0.0, 0.0, 0.0, 1.0)
    max_abs = scale = elementwise = dot = norm_a = norm_b = 0.0
    for start in range(0, a.size, _CHUNK):
        x = a[start : start + _CHUNK].astype(np.float64)
        y = b[start : start + _CHUNK].astype(np.float64)
        diff = np.abs(x - y)
        if not np.isfinite(diff).all():
            return Errors(float("inf"), float("inf"), float("inf"), float("nan"))
        ref = np.abs(y)
        max_abs, scale = max(max_abs, float(diff.max())), max(scale, float(ref.max()))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(ref > 0, diff / ref, np.where(diff > 0, np.inf, 0.0))
        elementwise = max(elementwise, float(rel.max()))
        dot, norm_a, norm_b = dot + float(x @ y), norm_a + float(x @ x), norm_b + float(y @ y)
    norms = float(np.sqrt(norm_a) * np.sqrt(norm_b))
    cosine = dot / norms if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    return Errors(max_abs, max_abs / scale if scale > 0 else max_abs, elementwise, cosine, scale)
