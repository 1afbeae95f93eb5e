"""Reports the stages write into artifacts and print: optimize's report.json, build's build.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2trt.core.log import plural
from llm2trt.core.manifest import DimRange, PassRecord
from llm2trt.core.pp import StageReport
from llm2trt.core.quant import Quantization
from llm2trt.core.records import Record
from llm2trt.core.tp import RankReport


@dataclass(frozen=True)
class Refusal(Record):
    """A candidate a rewrite rule did not fuse, and why."""

    rule: str
    node: str
    module: str
    reason: str


@dataclass(frozen=True)
class NumericCheck(Record):
    """The optimized graph against its input graph, both in ONNX Runtime, on the same inputs."""

    checked: bool
    reason: str | None = None  # why it was not checked
    tolerance: float | None = None
    max_rel_err: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None
    batch: int | None = None
    sequence: int | None = None
    cosine: dict[str, float] = field(default_factory=dict)  # when the policy bounds it (quantized graphs)
    min_cosine: float | None = None

    def worst(self) -> tuple[str, float]:
        return max(self.max_rel_err.items(), key=lambda kv: kv[1])

    def breach(self) -> str:
        """The first output out of tolerance, in a phrase."""
        for name, err in self.max_rel_err.items():
            if self.tolerance is not None and err > self.tolerance:
                return f"{name} max relative error {err:.2e} > {self.tolerance:.0e}"
            cosine = self.cosine.get(name)
            if self.min_cosine is not None and cosine is not None and cosine < self.min_cosine:
                return f"{name} cosine similarity {cosine:.4f} < {self.min_cosine}"
        return "within tolerance"

    def render(self) -> str:
        if not self.checked:
            return f"numeric check: not run ({self.reason})"
        text = f"numeric check: max relative error {self.worst()[1]:.2e} (tolerance {self.tolerance:.0e})"
        if self.cosine:
            text += f", min cosine {min(self.cosine.values()):.4f} (at least {self.min_cosine})"
        return text


def fusion_summary(found: dict[str, int], expected: dict[str, int]) -> str:
    """'Attention 2/2, RMSNorm 5/5' for expected fusions, 'Gelu 1' for the others found."""
    shown = [
        f"{name} {count}/{expected[name]}" if name in expected else f"{name} {count}"
        for name, count in found.items()
        if count or name in expected
    ]
    return ", ".join(shown) or "none"


@dataclass(frozen=True)
class OptimizeReport(Record):
    """What `optimize` did: report.json, and the body of its terminal output."""

    fusions: dict[str, int]
    expected: dict[str, int]
    skipped: list[str]
    missing: list[str]
    rules: dict[str, int]
    refusals: list[Refusal]
    passes: list[PassRecord]
    nodes_before: int
    nodes_after: int
    opset: int
    numeric_check: NumericCheck = field(default_factory=lambda: NumericCheck(False, "not run yet"))
    quantization: Quantization | None = None
    ranks: list[RankReport] = field(default_factory=list)  # optimize --tp
    stages: list[StageReport] = field(default_factory=list)  # optimize --pp

    def render(self) -> str:
        lines = [f"{self.nodes_before} -> {plural(self.nodes_after, 'node')}, opset {self.opset}"]
        for p in self.passes:
            counts = ", ".join(f"{k}={v}" for k, v in p.counts.items())
            lines.append(f"  {p.name:<24} {counts}")
        lines.append(f"  fusions found/expected: {fusion_summary(self.fusions, self.expected)}")
        lines += [f"  MISSING {line}" for line in self.missing]
        if self.quantization is not None:
            lines.append(f"  quantized {self.quantization.render()}")
        lines += [f"  {r.render()}" for r in self.ranks]
        lines += [f"  {s.render()}" for s in self.stages]
        lines.append(f"  {self.numeric_check.render()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ShapeRange(Record):
    """min/opt/max shapes of one input in one optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


Profile = dict[str, ShapeRange]  # input name -> its shapes


@dataclass(frozen=True)
class TimingCacheInfo(Record):
    path: str
    bytes_before: int
    bytes_after: int = 0
    hit: bool = False


@dataclass(frozen=True)
class PluginStatus(Record):
    """What a build did with one registered plugin."""

    name: str
    domain: str
    version: int
    status: str  # registered | inlined | unused
    reason: str = ""
    nodes: int = 0  # the op's nodes in the graph built


@dataclass(frozen=True)
class BuildInfo(Record):
    """build.json: how an engine was built."""

    backend: str  # tensorrt | tensorrt_rtx
    backend_version: str
    precision: str
    strongly_typed: bool
    compute_capability: str  # or "current-gpu"
    dims: dict[str, DimRange]
    optimization_profiles: list[Profile]
    plugins: list[PluginStatus]
    timing_cache: TimingCacheInfo | None
    strip_weights: bool
    parse_seconds: float
    build_seconds: float
    total_seconds: float
    engine_bytes: int
    network_layers: int
    attention_ops: int
    engine: str  # relative to the engine directory
    onnx: str  # the ONNX it was built from, relative to the engine directory
    fusions: dict[str, int]
    layer_types: dict[str, int] = field(default_factory=dict)
    profile_names: list[str] = field(default_factory=list)  # what each optimization profile is for
    static_dims: dict[str, int] = field(default_factory=dict)  # symbolic dims the engine fixes
    layer_precisions: dict[str, int] = field(default_factory=dict)  # network layers by output type
    matmul_precisions: dict[str, int] = field(default_factory=dict)  # 'int8 x int8': count
    quantization: str | None = None  # the artifact's method (optimize --quant)
    unfused_qdq: list[str] = field(default_factory=list)  # Q/DQ TensorRT would leave as scale layers
    optimization_level: int | None = None  # --opt-level (None: TensorRT's default, 3)

    def render(self) -> str:
        return self.describe(self.engine)

    def describe(self, engine: str) -> str:
        """The build in a line (and its inlined plugins), naming the engine as given."""
        text = (
            f"built {engine} with {self.backend} {self.backend_version} for {self.compute_capability}: "
            f"{plural(self.network_layers, 'layer')}, {self.engine_bytes / 1e6:.1f} MB in {self.build_seconds:.1f} s"
        )
        if self.quantization is not None:
            mms = ", ".join(f"{k} {v}" for k, v in sorted(self.matmul_precisions.items()))
            text += f"\n  {self.quantization}: matrix multiplies by operand types: {mms}"
        if self.unfused_qdq:
            shown = "; ".join(self.unfused_qdq[:3])
            text += f"\n  WARNING {len(self.unfused_qdq)} Q/DQ nodes TensorRT cannot fuse: {shown}"
        for p in self.plugins:
            if p.nodes:
                how = "as TensorRT plugin layers" if p.status == "registered" else f"inlined: {p.reason}"
                text += f"\n  plugin {p.domain}::{p.name} ({plural(p.nodes, 'node')}) {how}"
        return text
