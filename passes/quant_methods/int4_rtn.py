"""int4-rtn: INT4 weight-only in blocks of --group-size input channels, rounded to nearest with
absmax scales (no calibration)."""

from __future__ import annotations

from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_methods.method import QuantMethod


class Int4RoundToNearest(QuantMethod):
    name = "int4-rtn"
    weights = DType.INT4
    blockwise = True
    summary = "INT4 weight-only blocks, rounding"
    tolerance = TolerancePolicy(name, 1.0, 0.85)
