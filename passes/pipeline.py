"""The one place the optimize pipeline is assembled: registered entries, ordered, built from options.

An entry turns `PipelineOptions` into the passes it contributes (none when the options turn it
off). The options are typed records: what decides a built-in pass (KV cache, quantization, plugins,
the opset) has its own field, and an entry registered elsewhere finds its own record in `extra`
under its name, so a pass receives what it needs through its constructor rather than globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm2trt.core.kv import GQA, KVLayout
from llm2trt.core.lora import LoraRequest
from llm2trt.core.quant import QuantRequest
from llm2trt.core.registry import Registry
from llm2trt.passes.cleanup import ShapeInference, cleanup_passes
from llm2trt.passes.fusions import required_opset, rewrites
from llm2trt.passes.kv_cache import TENSOR_SCATTER_OPSET, KVCachePass
from llm2trt.passes.manager import GraphPass, PassManager
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.ort_gqa import DEFAULT_MAX_POSITIONS, GroupQueryAttentionPass
from llm2trt.passes.ort_ops import OrtKernelsPass
from llm2trt.passes.pattern import RewritePass
from llm2trt.passes.plugin_nodes import PluginRewrite
from llm2trt.passes.qdq import QUANT_OPSET, Calibrator, QuantPass


@dataclass(frozen=True)
class KVOptions:
    """The KV cache the graph should end with."""

    layout: KVLayout | None = None  # None: leave the cache as it is
    insert: bool = False  # the graph has none yet (`optimize --kv-cache`); else a growing cache is converted
    max_positions: int = DEFAULT_MAX_POSITIONS  # rotary tables of the gqa form, as long as the model's positions
    ort_kernels: bool = True  # the gqa form with llm2trt's own CUDA ops (norm + GEMV)
    # An INT8 cache: per layer, the (key, value) scales [kv_heads, head_dim] calibrated for it.
    int8_scales: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None


@dataclass(frozen=True)
class QuantOptions:
    """Q/DQ quantization: what was asked, and the calibration that methods with activation
    statistics need (None for weight-only rounding)."""

    request: QuantRequest
    calibrator: Calibrator | None = None


@dataclass(frozen=True)
class PipelineOptions:
    """What decides which passes run and how."""

    skip_fusions: tuple[str, ...] = ()
    opset: int | None = None  # the opset to upgrade to; None: the lowest the chosen passes need
    kv: KVOptions = field(default_factory=KVOptions)
    quant: QuantOptions | None = None
    plugins: tuple[PluginRewrite, ...] = ()
    lora: LoraRequest | None = None  # runtime LoRA slots (optimize --lora-slots)
    # Options of entries registered outside this module, by entry name; each entry reads its own type.
    extra: Mapping[str, object] = field(default_factory=dict)


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
    fusions = rewrites(options.skip_fusions)
    needed = required_opset(fusions) if fusions else None
    if options.kv.layout is not None and options.kv.layout.is_buffer:
        needed = max(needed or 1, TENSOR_SCATTER_OPSET)
    if options.quant is not None:
        needed = max(needed or 1, QUANT_OPSET)
    target = options.opset or needed
    return [OpsetUpgrade(target)] if target else []


def _kv(options: PipelineOptions) -> list[GraphPass]:
    if options.kv.layout is None:
        return []
    return [KVCachePass(options.kv.layout, options.kv.insert)]


def _gqa(options: PipelineOptions) -> list[GraphPass]:
    kv = options.kv
    if kv.layout is None or kv.layout.form != GQA:
        return []
    gqa = GroupQueryAttentionPass(kv.layout, kv.max_positions, untie=not kv.ort_kernels)
    passes: list[GraphPass] = [gqa, OrtKernelsPass()] if kv.ort_kernels else [gqa]
    if kv.int8_scales is not None:
        from llm2trt.passes.kv_int8 import Int8CachePass

        passes.append(Int8CachePass(dict(kv.int8_scales)))
    return passes


def _quant(options: PipelineOptions) -> list[GraphPass]:
    if options.quant is None:
        return []
    return [QuantPass(options.quant.request, options.quant.calibrator)]


def _lora(options: PipelineOptions) -> list[GraphPass]:
    if options.lora is None:
        return []
    from llm2trt.passes.lora_slots import LoraPass

    return [LoraPass(options.lora.slots, options.lora.max_rank, tuple(options.lora.targets))]


def _plugins(options: PipelineOptions) -> list[GraphPass]:
    from llm2trt.passes.plugin_nodes import PluginPass

    return [PluginPass(spec) for spec in options.plugins]


def _fusions(options: PipelineOptions) -> list[GraphPass]:
    return [RewritePass(f"fuse_{f.name.lower()}", [rule() for rule in f.rules]) for f in rewrites(options.skip_fusions)]


register_entry("cleanup", 100, lambda options: cleanup_passes())
register_entry("opset_upgrade", 200, _opset)
register_entry("fusions", 300, _fusions)
register_entry("quantize", 320, _quant)  # after the norms fused: scales fold into them
register_entry("lora", 330, _lora)  # after quantization (the base layers keep theirs), before the cache forms
register_entry("kv_cache", 350, _kv)
register_entry("ort_gqa", 360, _gqa)
register_entry("plugins", 380, _plugins)  # after quantization: it rewrites the Q/DQ it wrote
register_entry("shape_inference", 900, lambda options: [ShapeInference()])


def assemble(options: PipelineOptions) -> PassManager:
    """The pass manager for these options: every registered entry's passes, in entry order."""
    entries = sorted(PIPELINE.entries(), key=lambda e: e.order)
    return PassManager([p for entry in entries for p in entry.make(options)])
