"""Quantization methods (`optimize --quant`) and the manifest's record of what a quantization did.

A method names the quantized weight type, the activation type (None: weight-only) and the
algorithm that picks the scales. Everything here is vocabulary shared by the pass
(`llm2trt.passes.qdq`), the calibration runner, the manifest and the tolerance profiles; it
imports no pass and no runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.records import Record
from llm2trt.core.registry import Registry

DEFAULT_GROUP_SIZE = 128
DEFAULT_KEEP = ("lm_head",)  # modules left in high precision unless --keep says otherwise
DEFAULT_CALIB_SAMPLES = 16
DEFAULT_CALIB_SEQUENCE = 512


@dataclass(frozen=True)
class QuantMethod:
    """One `--quant` choice."""

    name: str
    weights: DType  # INT8 | FP8 | INT4
    activations: DType | None  # quantized per tensor with static (calibrated) scales; None: weight-only
    blockwise: bool = False  # weight scales per block of `group_size` input channels, else per output channel
    smooth: bool = False  # SmoothQuant: migrate activation outliers into the weights
    awq: bool = False  # AWQ: search per-channel scales (and clipping) on calibration activations
    summary: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None or self.smooth or self.awq

    @property
    def granularity(self) -> str:
        return "block" if self.blockwise else "per-channel"


METHODS: Registry[QuantMethod] = Registry("quantization method")


def register_method(method: QuantMethod) -> QuantMethod:
    return METHODS.register(method.name, method)


register_method(
    QuantMethod("int8-sq", DType.INT8, DType.INT8, smooth=True, summary="INT8 weights and activations, SmoothQuant")
)
register_method(QuantMethod("fp8", DType.FP8, DType.FP8, summary="FP8 E4M3 weights and activations, amax scales"))
register_method(QuantMethod("int8-wo", DType.INT8, None, summary="INT8 weight-only, per output channel"))
register_method(QuantMethod("int4-rtn", DType.INT4, None, blockwise=True, summary="INT4 weight-only blocks, rounding"))
register_method(
    QuantMethod("int4-awq", DType.INT4, None, blockwise=True, awq=True, summary="INT4 weight-only blocks, AWQ scales")
)


def qmax(dtype: DType) -> float:
    """The largest magnitude a symmetric scale maps amax to (TensorRT takes zero points of 0 only)."""
    limits = {DType.INT8: 127.0, DType.INT4: 7.0, DType.FP8: 448.0}
    if dtype not in limits:
        raise InputError(f"{dtype.value} is not a quantized type")
    return limits[dtype]


@dataclass(frozen=True)
class QuantRequest(Record):
    """What `optimize --quant` was asked for, checked before any work starts."""

    method: str
    group_size: int = DEFAULT_GROUP_SIZE
    alpha: float | None = None  # SmoothQuant's strength; None searches it per group
    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))  # regexes over module names
    calib: str | None = None  # a text file
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_sequence: int = DEFAULT_CALIB_SEQUENCE
    keep_sensitive: int = 0  # layer groups left in high precision, the most sensitive first

    def __post_init__(self) -> None:
        method = METHODS.get(self.method)
        if method.needs_calibration and self.calib is None:
            raise InputError(f"--quant {self.method} calibrates its scales: pass --calib TEXTFILE")
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise InputError(f"--group-size must be a power of two >= 2 (got {self.group_size})")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--alpha must be in [0, 1] (got {self.alpha})")
        if self.keep_sensitive and method.activations is None:
            raise InputError(f"--keep-sensitive measures activation quantization; {self.method} is weight-only")
        if self.keep_sensitive < 0:
            raise InputError(f"--keep-sensitive must be >= 0 (got {self.keep_sensitive})")
        if self.calib_samples < 1 or self.calib_sequence < 2:
            raise InputError("--calib-samples must be >= 1 and the calibration sequence >= 2 tokens")

    @property
    def spec(self) -> QuantMethod:
        return METHODS.get(self.method)


@dataclass(frozen=True)
class Calibration(Record):
    """The calibration run behind activation statistics."""

    text: str  # the file's name (not its path: artifacts move)
    sha256: str
    samples: int  # windows run
    tokens: int
    seconds: float
    peak_rss_mb: float  # of the process, at the end of calibration


@dataclass(frozen=True)
class Quantization(Record):
    """The manifest's `quantization` section: what was quantized, how, and where the scales came from."""

    method: str
    weights: DType
    activations: DType | None
    granularity: str  # per-channel | block
    group_size: int | None
    alpha: float | None  # SmoothQuant's, when fixed
    quantized: list[str]  # modules whose linear layers carry Q/DQ
    kept: dict[str, str]  # module -> why it stayed in high precision
    smoothed: int  # linear layers whose input scale was migrated (SmoothQuant, AWQ)
    scales: str  # where the scales came from
    calibration: Calibration | None = None
    # The migration strength of each smoothed group (by its first layer): searched or fixed.
    alphas: dict[str, float] = field(default_factory=dict)
    # The fraction of each static activation range's amax kept (searched; SmoothQuant).
    activation_clips: dict[str, float] = field(default_factory=dict)
    # Per group (by its first layer): relative error of its outputs on calibration rows, quantized.
    sensitivity: dict[str, float] = field(default_factory=dict)
    # INT4 layers whose input channels --group-size does not divide: the block they use instead.
    block_sizes: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        grain = f"blocks of {self.group_size}" if self.granularity == "block" else "per channel"
        if self.block_sizes:
            grain += f" ({len(self.block_sizes)} layers in smaller blocks: {min(self.block_sizes.values())} and up)"
        acts = f", activations {self.activations.value} per tensor" if self.activations else ", weight-only"
        return (
            f"{self.method}: {len(self.quantized)} linear layers, weights {self.weights.value} {grain}{acts}; "
            f"{len(self.kept)} kept in high precision; scales from {self.scales}"
        )
