"""What `optimize --quant` is asked for and the manifest's record of what a quantization did.

The vocabulary every method shares: the request (the method by name, the numbers, the checks that
hold for any method), the defaults, and the records. The methods themselves, with their own
checks, searches and tolerance profiles, are classes in `llm2trt.passes.quant_methods`; this
module imports no pass and no runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.log import plural
from llm2trt.core.records import Record

DEFAULT_GROUP_SIZE = 128
DEFAULT_KEEP = ("lm_head",)  # modules left in high precision unless --keep says otherwise
DEFAULT_CALIB_SAMPLES = 16
DEFAULT_CALIB_SEQUENCE = 512
DEFAULT_MAX_PPL_INCREASE = 1.0  # percent: --quant auto's budget unless --max-ppl-increase says otherwise


@dataclass(frozen=True)
class QuantRequest(Record):
    """What `optimize --quant` was asked for. The checks here hold for every method; the method's
    own (`QuantMethod.check`) run where the request is used, before anything loads."""

    method: str  # a name in llm2trt.passes.quant_methods.METHODS
    group_size: int = DEFAULT_GROUP_SIZE
    alpha: float | None = None  # SmoothQuant's strength; None searches it per group
    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))  # regexes over module names
    calib: str | None = None  # a text file; None: the built-in one (llm2trt/data/) for methods that calibrate
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_sequence: int = DEFAULT_CALIB_SEQUENCE
    keep_sensitive: int = 0  # layer groups left in high precision, the most sensitive first
    max_ppl_increase: float | None = None  # percent; --quant auto's budget (None there: the default)

    def __post_init__(self) -> None:
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise InputError(f"--max-ppl-increase is a percentage > 0 (got {self.max_ppl_increase})")
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise InputError(f"--group-size must be a power of two >= 2 (got {self.group_size})")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--alpha must be in [0, 1] (got {self.alpha})")
        if self.keep_sensitive < 0:
            raise InputError(f"--keep-sensitive must be >= 0 (got {self.keep_sensitive})")
        if self.calib_samples < 1 or self.calib_sequence < 2:
            raise InputError("--calib-samples must be >= 1 and the calibration sequence >= 2 tokens")


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
class PlanMeasurement(Record):
    """One perplexity measurement behind --quant auto's plan, on its scoring windows."""

    what: str  # high precision | everything <method> | the plan (round N)
    nll: float  # mean negative log-likelihood per scored token
    increase: float  # percent, the perplexity against high precision's


@dataclass(frozen=True)
class AutoPlan(Record):
    """--quant auto: the precision each layer group got within the perplexity budget."""

    budget: float  # percent of perplexity, --max-ppl-increase
    candidates: list[str]  # the methods tried, cheapest first; a group may also stay in high precision
    groups: dict[str, str]  # group (by its first layer) -> a candidate, or "kept"
    counts: dict[str, int]  # groups per choice
    weight_bytes: int  # the linear layers' weights as chosen: codes and scales (scales and kept at 2 bytes)
    weight_bytes_fp16: int  # the same layers in fp16
    estimated: float  # percent: the plan's predicted perplexity increase
    measured: float  # percent: measured on the scoring windows
    windows: int  # scoring windows (of the calibration text)
    held_out: bool  # the scoring windows were not the ones scales were calibrated on
    measurements: list[PlanMeasurement] = field(default_factory=list)
    # Per group and candidate: the relative output error on the calibration rows, the estimate's input.
    errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def render(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        return (
            f"plan within +{self.budget:g}% perplexity: {counts} (groups); estimated +{self.estimated:.2f}%, "
            f"measured {self.measured:+.2f}% on {plural(self.windows, 'window')}; weights "
            f"{self.weight_bytes / max(self.weight_bytes_fp16, 1):.3f} of fp16"
        )


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
    dampening: float | None = None  # GPTQ's, of the Hessian's mean diagonal
    # Per group (by its first layer), a method that computes its own codes (GPTQ): its output error on
    # the calibration tokens (Hessian-weighted) over plain rounding's.
    error_vs_rounding: dict[str, float] = field(default_factory=dict)
    plan: AutoPlan | None = None  # --quant auto: what each group got and why

    def render(self) -> str:
        if self.plan is not None:
            return f"{self.method}: {len(self.quantized)} linear layers quantized; {self.plan.render()}"
        grain = f"blocks of {self.group_size}" if self.granularity == "block" else "per channel"
        if self.block_sizes:
            smallest = min(self.block_sizes.values())
            grain += f" ({plural(len(self.block_sizes), 'layer')} in smaller blocks: {smallest} and up)"
        acts = f", activations {self.activations.value} per tensor" if self.activations else ", weight-only"
        return (
            f"{self.method}: {len(self.quantized)} linear layers, weights {self.weights.value} {grain}{acts}; "
            f"{len(self.kept)} kept in high precision; scales from {self.scales}"
        )
