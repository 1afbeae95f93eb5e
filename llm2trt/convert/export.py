"""convert: a transformers model to an ONNX artifact (external data, dynamic axes, manifest).

We export with torch.onnx's TorchScript exporter (`dynamo=False`); README.md records the
measurements behind that choice.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import onnx

from llm2trt import __version__
from llm2trt.convert.patches import experts_for_export, longrope_for_export, sdpa_for_export
from llm2trt.convert.sources import ModelSource
from llm2trt.convert.tokenizer import save_tokenizer
from llm2trt.core.artifact import op_counts, save_onnx, staged_output
from llm2trt.core.dtypes import DType, to_torch
from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.kv import GQA_COUNTERS
from llm2trt.core.log import plural, step
from llm2trt.core.lora import LoraAdapter
from llm2trt.core.manifest import GraphSpec, Manifest, PassRecord, TensorSpec
from llm2trt.core.records import Record
from llm2trt.passes.ort_op_table import DOMAIN, VERSION

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The TorchScript exporter's range; fused opset-23 ops come from `optimize`, not from here.
OPSETS = range(14, 21)
# Shapes traced at export; compare runs other shapes so a dim baked in by tracing shows up.
TRACE_BATCH, TRACE_SEQUENCE = 2, 8


@dataclass(frozen=True)
class Converted(Record):
    """What `convert` wrote."""

    source: str
    output: str
    manifest: Manifest

    def render(self) -> str:
        m = self.manifest
        return (
            f"converted {self.source} -> {self.output} ({m.architecture}, {m.task}, {m.dtype.value}, "
            f"{plural(sum(m.op_counts.values()), 'node')})"
        )


def export_module(model: torch.nn.Module, graph: GraphSpec, forward_kwargs: dict[str, Any]) -> torch.nn.Module:
    """The transformers model with the graph's interface: its inputs positionally, in graph order,
    and a tuple of its outputs. KV graphs take the cache as plain tensors (transformers' cache
    objects cannot cross the exporter) and return the updated cache after the model's outputs.

    A fixed-size cache (only ever produced by rewriting an exported graph) is emulated for the
    PyTorch reference: the valid prefix goes in, the new entries are written into the buffer.
    """
    import torch

    inputs, outputs, kv = [t.name for t in graph.inputs], [t.name for t in graph.outputs], graph.kv_cache
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model_outputs = [name for name in outputs if kv is None or name not in kv.present_names]

    class ExportWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            named = dict(zip(inputs, args, strict=True))
            if kv is None:
                out = self.model(**named, **forward_kwargs, return_dict=True)
                return tuple(out[name] for name in outputs)
            past = [named.pop(name) for name in kv.past_names]
            for counter in GQA_COUNTERS:  # GroupQueryAttention's view of the positions: derivable
                named.pop(counter, None)
            if kv.is_buffer:
                return _run_fixed(self.model, named, past, cache_arg, model_outputs)
            out, presents = _run_cached(self.model, named, past, cache_arg)
            return (*(out[name] for name in model_outputs), *presents)

    # The exporter restores the wrapper's own train/eval mode afterwards: it must be eval too.
    return ExportWrapper().eval()


def _run_cached(
    model: torch.nn.Module, named: dict[str, torch.Tensor], past: list[torch.Tensor], cache_arg: str
) -> tuple[Any, list[torch.Tensor]]:
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
    out = model(**named, **{cache_arg: cache}, use_cache=True, return_dict=True)
    updated = out[cache_arg]
    return out, [t for layer in updated.layers for t in (layer.keys, layer.values)]


def _run_fixed(
    model: torch.nn.Module,
    named: dict[str, torch.Tensor],
    buffers: list[torch.Tensor],
    cache_arg: str,
    outputs: list[str],
) -> tuple[torch.Tensor, ...]:
    import torch

    positions = named["position_ids"]
    start = int(positions[0, 0])
    if not bool((positions[:, 0] == start).all()):
        raise InputError("the PyTorch reference of a fixed-size cache takes rows at one position")
    length = positions.shape[1]
    named["attention_mask"] = torch.ones(positions.shape[0], start + length, dtype=torch.int64)
    out, presents = _run_cached(model, named, [b[:, :, :start] for b in buffers], cache_arg)
    updated = [buffer.clone() for buffer in buffers]
    for buffer, present in zip(updated, presents, strict=True):
        buffer[:, :, start : start + length] = present[:, :, start:]
    return (*(out[name] for name in outputs), *updated)


def torchscript_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    graph: GraphSpec,
    opset: int,
    custom_opsets: dict[str, int] | None = None,
) -> None:
    import torch

    tensors = [*graph.inputs, *graph.outputs]
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in tensors}
    with warnings.catch_warnings(), sdpa_for_export(), _exporter_log_dropped():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[t.name for t in graph.inputs],
                output_names=[t.name for t in graph.outputs],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                custom_opsets=custom_opsets,
            )
        except Exception as exc:  # the exporter raises many types; name the cause, go no further
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BackendError(f"torch.onnx export failed: {type(exc).__name__}: {first}") from None


@contextlib.contextmanager
def _exporter_log_dropped() -> Iterator[None]:
    """The exporter prints the whole TorchScript graph to the process's stderr when it fails (its
    log switch is always on); the user gets one line naming the cause instead. Anything else
    written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = text.split("Torch IR graph at exception")[0]
            if kept.strip():
                sys.stderr.write(kept)


def _name_dims(model: onnx.ModelProto, specs: list[TensorSpec], kind: str) -> None:
    """Make the graph's I/O carry exactly the manifest's dims (the exporter may invent names)."""
    values = model.graph.input if kind == "input" else model.graph.output
    by_name = {v.name: v for v in values}
    for spec in specs:
        value = by_name.get(spec.name)
        if value is None:
            raise BackendError(f"the exported graph has no {kind} named {spec.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise BackendError(f"exported {kind} {spec.name!r} has rank {len(dims)}, expected {len(spec.shape)}")
        for dim, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise BackendError(f"exported {kind} {spec.name!r} has dims {dims}, expected {spec.shape}")
            else:
                dim.dim_value = want


def _trace(
    source: ModelSource,
    graph: GraphSpec,
    dtype: DType,
    attn: str,
    opset: int,
    scratch: Path,
    adapters: Sequence[LoraAdapter] = (),
) -> onnx.ModelProto:
    """Load the model (with `adapters` merged), trace one graph variant and return it as ONNX with
    the manifest's dims."""
    spec = source.spec
    model = source.load(dtype, attn)
    if adapters:
        from llm2trt.convert.lora import merge_adapters

        merge_adapters(model, adapters)
    cast(Any, model).config.use_cache = graph.kv_cache is not None
    tied = _tied_embedding(model)
    module = export_module(model, graph, dict(spec.forward_kwargs))
    feeds = spec.sample_inputs(source.config, graph, TRACE_BATCH, TRACE_SEQUENCE)
    args = tuple(to_torch(feeds[t.name]) for t in graph.inputs)
    with (
        step(f"exporting {source.display} to ONNX (TorchScript exporter, opset {opset})"),
        longrope_for_export(model),
        experts_for_export(model, spec.expert_classes) as experts,
    ):
        domains = {DOMAIN: VERSION} if experts else None  # (the exporter warns of a domain it does not use)
        torchscript_export(module, args, scratch / "model.onnx", graph, opset, domains)
    del model, module
    # Over 2 GB the exporter writes its weights beside the file: they stay there until save_onnx
    # copies them file to file (reading them in would hold a second copy of the model).
    proto = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
    if experts:
        from llm2trt.passes.moe import attach_moe

        found = attach_moe(proto)
        if found != experts:
            raise BackendError(f"the export holds {found} MoE nodes for {plural(experts, 'experts module')}")
    if tied is not None:
        _tie(proto, f"model.{tied}", scratch)
    _name_dims(proto, graph.inputs, "input")
    _name_dims(proto, graph.outputs, "output")
    proto.producer_name, proto.producer_version = "llm2trt", __version__
    return proto


def _tied_embedding(model: torch.nn.Module) -> str | None:
    """The parameter name of an input embedding the output projection shares, if it does."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inner, outer = (get_in() if get_in else None), (get_out() if get_out else None)
    weight = getattr(inner, "weight", None)
    if weight is None or outer is None or getattr(outer, "weight", None) is not weight:
        return None
    return next((name for name, p in model.named_parameters(remove_duplicate=False) if p is weight), None)


def _tie(proto: onnx.ModelProto, name: str, scratch: Path) -> None:
    """Write a tied embedding once: the exporter folds lm_head's transpose of it into a second
    initializer; read it as Transpose(embedding) instead (ONNX Runtime and TensorRT fold that at
    load time; `optimize` leaves it, see ConstantFolding)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    table = inits.get(name)
    if table is None or len(table.dims) != 2:
        return
    values = numpy_helper.to_array(table, base_dir=str(scratch))
    for copy in [t for t in proto.graph.initializer if list(t.dims) == list(table.dims)[::-1]]:
        if copy.data_type == table.data_type and (numpy_helper.to_array(copy, base_dir=str(scratch)) == values.T).all():
            proto.graph.initializer.remove(copy)
            node = onnx.helper.make_node("Transpose", [name], [copy.name], name=f"{name}/Transpose_tied", perm=[1, 0])
            proto.graph.node.insert(0, node)
            logger.info("tied embedding %s written once (lm_head reads its transpose)", name)


def _float32_residual(proto: onnx.ModelProto, scratch: Path) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """The exported fp16 graph with its residual stream in float32 (see passes/residual.py)."""
    from llm2trt.passes.cleanup import ShapeInference
    from llm2trt.passes.manager import Model, PassManager
    from llm2trt.passes.residual import Float32Residual

    with step("keeping the residual stream in float32"):
        result = PassManager([ShapeInference(), Float32Residual()]).run(Model.from_onnx(proto, scratch))
    records = [replace(r, stage="convert") for r in result.records if r.name == Float32Residual.name]
    if not records[0].counts["float32_adds"]:
        raise BackendError("the fp16 export has no residual Add of a float32 norm to keep in float32")
    return result.model.to_onnx(), records


def convert(
    source: ModelSource,
    out: Path,
    *,
    dtype: DType = DType.FP32,
    opset: int = DEFAULT_OPSET,
    attn_implementation: str = "sdpa",
    kv_cache: bool = True,
    force: bool = False,
    adapters: Sequence[LoraAdapter] = (),
) -> Converted:
    """Export `source` into the artifact directory `out`: decoders with KV-cache I/O unless
    `kv_cache` is False; LoRA `adapters` merged into the weights first."""
    if opset not in OPSETS:
        raise InputError(
            f"opset {opset} is outside what the TorchScript exporter supports "
            f"({OPSETS.start}-{OPSETS.stop - 1}); fused opset-23 ops come from `optimize`"
        )
    if adapters and source.prequant is not None:
        raise InputError(
            "--lora: a pre-quantized checkpoint is imported as its own codes, which a merged adapter would "
            "change; merge the adapter into its float model, or quantize after merging"
        )
    spec, config = source.spec, source.config
    attn_implementation = spec.attention(attn_implementation)
    graph = spec.graph_spec(config, dtype, spec.default_variant(kv_cache))
    with staged_output(out, force) as stage:
        scratch = stage / "export"
        scratch.mkdir()
        proto = _trace(source, graph, dtype, attn_implementation, opset, scratch, adapters)
        records: list[PassRecord] = []
        if dtype is DType.FP16 and spec.fp16_residual_in_float32:
            proto, records = _float32_residual(proto, scratch)
        quantization = None
        if source.prequant is not None:  # the checkpoint's own codes replace the weights it dequantized to
            with step("importing the checkpoint's quantized weights"):
                proto, imported, quantization = source.prequant.apply(proto, scratch)
            records += imported
            opset = max(opset, *(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))
        with step("writing model.onnx and its external weights"):
            written = save_onnx(proto, stage, source=scratch, clone=False)  # the exporter's files: one per weight
        shutil.rmtree(scratch)
        logger.info("wrote %s, %.1f MB of weights", plural(len(proto.graph.node), "node"), written.nbytes / 1e6)
        generation = save_tokenizer(source, stage) if spec.task(config).task == "text-generation" else None
        manifest = Manifest(
            architecture=spec.name,
            model_type=str(config.model_type),
            model_class=spec.model_class(config),
            task=spec.task(config).task,
            dtype=dtype,
            opset=opset,
            source=source.info(),
            graphs={
                graph.name: replace(
                    graph,
                    op_counts=op_counts(proto),
                    external_data=written.files,
                    external_data_sha256=written.sha256,
                )
            },
            attn_implementation=attn_implementation,
            exporter="torchscript",
            model_config=config.to_diff_dict(),
            generation=generation,
            passes=records,
            quantization=quantization,
            adapters=[a.record for a in adapters],
        )
        manifest.write(stage)
    return Converted(source.display, str(out), manifest)
