"""int8-wo: INT8 weight-only, per output channel, absmax scales (no calibration)."""

from __future__ import annotations

from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_methods.method import QuantMethod


class Int8WeightOnly(QuantMethod):
    name = "int8-wo"
    weights = DType.INT8
    summary = "INT8 weight-only, per output channel"
    tolerance = TolerancePolicy(name, 1.0, 0.98)
