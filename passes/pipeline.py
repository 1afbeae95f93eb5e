"""The one place the optimize pipeline is assembled: registered entries, ordered, built from options.

An entry turns `PipelineOptions` into the passes it contributes (none when the options turn it
off). Options carry per-entry configuration (`settings`) and data a pass needs (`data`, e.g.
calibration samples), so a pass receives them through its constructor rather than globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm2trt.core.kv import GQA, KVLayout
from llm2trt.core.registry import Registry
from llm2trt.passes.cleanup import ShapeInference, cleanup_passes
from llm2trt.passes.manager import GraphPass, PassManager
from llm2trt.passes.fusions import required_opset, selected
from llm2trt.passes.kv_cache import TENSOR_SCATTER_OPSET, KVCachePass
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.ort_gqa import DEFAULT_MAX_POSITIONS, GroupQueryAttentionPass
from llm2trt.passes.ort_ops import OrtKernelsPass
from llm2trt.passes.pattern import RewritePass
from llm2trt.passes.qdq import QUANT_OPSET, QuantPass


@dataclass(frozen=True)
class PipelineOptions:
    """What decides which passes run and how."""

    skip_fusions: tuple[str, ...] = ()
    # The KV cache the graph should end with (None: leave the cache as it is); `kv_insert` when the
    # graph has none yet (`optimize --kv-cache`), else an existing growing cache is converted.
    kv_layout: KVLayout | None = None
    kv_insert: bool = False
    # Configuration by entry name, e.g. {"opset_upgrade": {"target": 24}}.
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Data passes need, by key (calibration samples, ...).
    data: Mapping[str, Any] = field(default_factory=dict)

    def setting(self, entry: str, key: str, default: Any = None) -> Any:
        return self.settings.get(entry, {}).get(key, default)


@dataclass(frozen=True)
class PipelineEntry:
    """A step of the pipeline: where it goes (`order`) and the passes it makes from the options."""

    name: str
    order: int
    make: Callable[[PipelineOptions], Sequence[GraphPass]]


PIPELINE: Registry[PipelineEntry] = Registry("pipeline entry")


def register_entry(name: str, order: int, make: Callable[[PipelineOptions], Sequence[GraphPass]]) -> PipelineEntry:
    return PIPELINE.register(name, PipelineEntry(name, order, make))


def _opset(options: PipelineOptions) -> list[GraphPass]:
    fusions = selected(options.skip_fusions)
    needed = required_opset(fusions) if fusions else None
    if options.kv_layout is not None and options.kv_layout.is_buffer:
        needed = max(needed or 1, TENSOR_SCATTER_OPSET)
    if options.setting("quantize", "request") is not None:
        needed = max(needed or 1, QUANT_OPSET)
    target = options.setting("opset_upgrade", "target", needed)
    return [OpsetUpgrade(int(target))] if target else []


def _kv(options: PipelineOptions) -> list[GraphPass]:
    if options.kv_layout is None:
        return []
    return [KVCachePass(options.kv_layout, options.kv_insert)]


def _gqa(options: PipelineOptions) -> list[GraphPass]:
    if options.kv_layout is None or options.kv_layout.form != GQA:
        return []
    limit = options.setting("ort_gqa", "max_positions", DEFAULT_MAX_POSITIONS)
    kernels = bool(options.setting("ort_kernels", "enabled", True))
    gqa = GroupQueryAttentionPass(options.kv_layout, int(limit), untie=not kernels)
    return [gqa, OrtKernelsPass()] if kernels else [gqa]


def _quant(options: PipelineOptions) -> list[GraphPass]:
    request = options.setting("quantize", "request")
    if request is None:
        return []
    return [QuantPass(request, options.data.get("calibrator"))]


def _plugins(options: PipelineOptions) -> list[GraphPass]:
    from llm2trt.passes.plugin_nodes import PluginPass

    return [PluginPass(spec) for spec in options.data.get("plugins", ())]


def _fusions(options: PipelineOptions) -> list[GraphPass]:
    return [RewritePass(f"fuse_{f.name.lower()}", [rule() for rule in f.rules]) for f in selected(options.skip_fusions)]


register_entry("cleanup", 100, lambda options: cleanup_passes())
register_entry("opset_upgrade", 200, _opset)
register_entry("fusions", 300, _fusions)
register_entry("quantize", 320, _quant)  # after the norms fused: scales fold into them
register_entry("kv_cache", 350, _kv)
register_entry("ort_gqa", 360, _gqa)
register_entry("plugins", 380, _plugins)  # after quantization: it rewrites the Q/DQ it wrote
register_entry("shape_inference", 900, lambda options: [ShapeInference()])


def assemble(options: PipelineOptions) -> PassManager:
    """The pass manager for these options: every registered entry's passes, in entry order."""
    entries = sorted(PIPELINE.entries(), key=lambda e: e.order)
    return PassManager([p for entry in entries for p in entry.make(options)])
