"""`QuantMethod`: one `optimize --quant` choice, as a class holding everything that is the method's
own: its types and granularity, how it picks scales (the searches the pass calls through the hooks
below), what it asks of a request, and the tolerance its graphs are checked with.

The pass (`llm2trt.passes.qdq.QuantPass`) does the graph side for every method alike: it finds the
linear layers and their groups (the layers reading one input), folds a migrated scale upstream,
writes the weight's DequantizeLinear and, when `activations` is set, the input's static Q/DQ pair.
A method decides only the numbers. A new one is a subclass in a file of this package and one
`register(...)` line in its `__init__.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.quant import QuantRequest
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_math import ActStats

# Calibration tokens under which a calibrated method warns: on SmolLM2-135M GPTQ and int8-sq level off at
# 8,192 tokens; under it int8-sq loses 3 points more and GPTQ's graph failed optimize's check at 2,048 and
# 4,096 (docs/quantization.md, "How much calibration text: a sweep").
MIN_CALIB_TOKENS = 8192


@dataclass(frozen=True)
class InputScale:
    """What a method's search chose for one input tensor (the layers reading it share it)."""

    s: np.ndarray | None = None  # per input channel: weight rows times s, 1/s folded upstream (None: none)
    alpha: float | None = None  # the migration strength behind s, recorded in the manifest
    clip: float | None = None  # the fraction of the activation amax its static scale keeps (None: not searched)
    note: str = ""  # for the debug log


@dataclass(frozen=True)
class GroupCodes:
    """What a method that computes its own codes (`QuantMethod.quantize`) made of one group."""

    layers: list[tuple[np.ndarray, np.ndarray]]  # per layer, in order: codes [in, out] and scales
    error_vs_rounding: float | None = None  # the group's output error over rounding's, for the manifest


class QuantMethod:
    """Base of the quantization methods. A subclass sets the class attributes and overrides the
    hooks its algorithm needs; the defaults are plain absmax scales with nothing searched.

    Quantized graphs are checked against their unquantized input on random tokens (optimize's
    check): the normwise error of logits reaches 0.5 on SmolLM2 int8-sq where perplexity moves 3%,
    so `tolerance` bounds the direction (cosine); its rtol only catches a broken graph."""

    name: str
    weights: DType  # INT8 | FP8 | INT4
    activations: DType | None = None  # quantized per tensor with static (calibrated) scales; None: weight-only
    blockwise: bool = False  # weight scales per block of `group_size` input channels, else per output channel
    # Migrates a per-input-channel scale s into the weights, 1/s folded into what produces the input
    # (SmoothQuant's migration; AWQ's too): the pass finds the fold and calls `input_scale`.
    smooth: bool = False
    # Calibration also sums x^T x of each linear input (a [C, C] matrix per input tensor: GPTQ's Hessian).
    needs_hessian: bool = False
    dampening: float | None = None  # GPTQ's: of the Hessian's mean diagonal (recorded in the manifest)
    # Chooses a method per layer group (`--quant auto`): the pass plans instead of quantizing alike.
    mixed: bool = False
    # Calibration tokens under which it warns (MIN_CALIB_TOKENS for the calibrated methods).
    min_calib_tokens: int = 0
    summary: str = ""
    tolerance: TolerancePolicy  # its mode is `name`: `profile_for(dtype, name)` finds it

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None or self.smooth or self.needs_hessian or self.mixed

    @property
    def granularity(self) -> str:
        return "block" if self.blockwise else "per-channel"

    def check(self, request: QuantRequest) -> None:
        """Refuse a request this method cannot honour, before anything loads (QuantRequest checks
        what holds for every method)."""
        if request.max_ppl_increase is not None:
            raise InputError(f"--max-ppl-increase is the budget of --quant auto, not of --quant {self.name}")
        if request.keep_sensitive and self.activations is None:
            raise InputError(f"--keep-sensitive measures activation quantization; {self.name} is weight-only")

    def input_scale(
        self, stat: ActStats, weights: Sequence[np.ndarray], request: QuantRequest, block: int, *, foldable: bool
    ) -> InputScale:
        """A `smooth` method's search for one group: `weights` ([in, out] each, as they are) read the
        input `stat` describes; `block` is the group's INT4 block. With `foldable` False there is
        nowhere to fold 1/s: s must stay None (a clip may still be searched)."""
        raise NotImplementedError(f"{self.name} sets smooth but does not search an input scale")

    def weight_clip(self, w: np.ndarray, stat: ActStats | None, s: np.ndarray | None, block: int) -> np.ndarray | None:
        """The fraction of each weight scale's amax to keep ([out], or [in // block, out] per block),
        for `w` as it will be quantized (migrated by s when the group was); None keeps all of it.
        `stat`: the group's input statistics when the method calibrates."""
        return None

    def quantize(self, weights: Sequence[np.ndarray], stat: ActStats | None, block: int) -> GroupCodes | None:
        """Codes and scales for the weights of one group (the layers reading one input, [in, out]
        each, after any migration), for a method that computes them itself rather than rounding
        with `weight_scale` (GPTQ); None rounds. `stat`: the input's statistics when it calibrates."""
        return None

    def fixed_alpha(self, request: QuantRequest) -> float | None:
        """The migration strength the request fixes for this method (the manifest's `alpha`)."""
        return None
