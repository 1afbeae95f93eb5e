"""The quantization methods (`optimize --quant`), one class per file, registered here: the registry
`METHODS` the CLI's choices, the pass and the optimize stage read. Registering a method also
registers its tolerance profile (`llm2trt.core.tolerance.PROFILES`), under the method's name.

A new method: a `QuantMethod` subclass in its own file here, and one `register(...)` line below.
"""

from __future__ import annotations

from llm2trt.core.registry import Registry
from llm2trt.core.tolerance import register_profile
from llm2trt.passes.quant_methods.auto import AutoMixed
from llm2trt.passes.quant_methods.fp8 import Fp8Amax
from llm2trt.passes.quant_methods.int4_awq import Int4AWQ
from llm2trt.passes.quant_methods.int4_gptq import Int4GPTQ
from llm2trt.passes.quant_methods.int4_rtn import Int4RoundToNearest
from llm2trt.passes.quant_methods.int8_sq import Int8SmoothQuant
from llm2trt.passes.quant_methods.int8_wo import Int8WeightOnly
from llm2trt.passes.quant_methods.method import GroupCodes, InputScale, QuantMethod

__all__ = ["METHODS", "GroupCodes", "InputScale", "QuantMethod", "register"]

METHODS: Registry[QuantMethod] = Registry("quantization method")


def register(method: QuantMethod, *, replace: bool = False) -> QuantMethod:
    """Add a method and its tolerance profile (checked as `optimize`'s numeric check)."""
    if method.tolerance.mode != method.name:
        raise ValueError(f"{method.name}'s tolerance profile is named {method.tolerance.mode!r}")
    METHODS.register(method.name, method, replace=replace)
    register_profile(method.tolerance, replace=replace)
    return method


# In the CLI's order of choices.
register(Int8SmoothQuant())
register(Fp8Amax())
register(Int8WeightOnly())
register(Int4RoundToNearest())
register(Int4AWQ())
register(Int4GPTQ())
register(AutoMixed())  # a plan over the methods above
