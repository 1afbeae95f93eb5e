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


@dataclass(frozen=True)
class InputScale:
    """What a method's search chose for one input tensor (the layers reading it share it)."""

    s: np.ndarray | None = None  # per input channel: weight rows times s, 1/s folded upstream (None: none)
    alpha: float | None = None  # the migration strength behind s, recorded in the manifest
    clip: float | None = None  # the fraction of the activation amax its static scale keeps (None: not searched)
    note: str = ""  # for the debug log


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
    summary: str = ""
    tolerance: TolerancePolicy  # its mode is `name`: `profile_for(dtype, name)` finds it

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None or self.smooth

    @property
    def granularity(self) -> str:
        return "block" if self.blockwise else "per-channel"

    def check(self, request: QuantRequest) -> None:
        """Refuse a request this method cannot honour, before anything loads (QuantRequest checks
        what holds for every method)."""
        if self.needs_calibration and request.calib is None:
            raise InputError(f"--quant {self.name} calibrates its scales: pass --calib TEXTFILE")
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

    def fixed_alpha(self, request: QuantRequest) -> float | None:
        """The migration strength the request fixes for this method (the manifest's `alpha`)."""
        return None
