"""convert: a transformers model to an ONNX artifact (external data, dynamic axes, manifest).

We export with torch.onnx's TorchScript exporter (`dynamo=False`); README.md records the
measurements behind that choice.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx

from llm2trt import __version__
from llm2trt.artifact import save_onnx, staged_output
from llm2trt.errors import BackendError, InputError
from llm2trt.exporters import ExportSpec
from llm2trt.log import step
from llm2trt.manifest import Manifest, TensorSpec
from llm2trt.models import ModelSource, numpy_dtype_name, torch_dtype
from llm2trt.patches import sdpa_for_export

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The TorchScript exporter's range; fused opset-23 ops come from `optimize`, not from here.
OPSETS = range(14, 21)
# Shapes traced at export; compare runs other shapes so a dim baked in by tracing shows up.
TRACE_BATCH, TRACE_SEQUENCE = 2, 8


def _export_module(
    model: torch.nn.Module, input_names: list[str], output_names: list[str], forward_kwargs: dict[str, Any]
) -> torch.nn.Module:
    """Wrap a transformers model so tensors go in positionally and a tuple comes out."""
    import torch

    class ExportWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(**dict(zip(input_names, args, strict=True)), **forward_kwargs, return_dict=True)
            return tuple(out[name] for name in output_names)

    # The exporter restores the wrapper's own train/eval mode afterwards: it must be eval too.
    return ExportWrapper().eval()


def sample_tensors(
    spec: ExportSpec, config: Any, inputs: list[TensorSpec], batch: int, sequence: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """The spec's sample inputs, float ones cast to the graph's input dtype."""
    feeds = spec.sample_inputs(config, batch, sequence, seed)
    for tensor in inputs:
        if tensor.dtype == "bfloat16":
            import ml_dtypes

            feeds[tensor.name] = feeds[tensor.name].astype(ml_dtypes.bfloat16)
        else:
            feeds[tensor.name] = feeds[tensor.name].astype(tensor.dtype)
    return feeds


def to_torch(array: np.ndarray) -> torch.Tensor:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _torchscript_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    opset: int,
) -> None:
    import torch

    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in [*inputs, *outputs]}
    with warnings.catch_warnings(), sdpa_for_export():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


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


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(
        (node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for node in model.graph.node
    )
    return dict(sorted(counts.items()))


def convert(
    source: ModelSource,
    out: Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    attn_implementation: str = "sdpa",
    force: bool = False,
) -> Manifest:
    """Export `source` into the artifact directory `out`."""
    if opset not in OPSETS:
        raise InputError(
            f"opset {opset} is outside what the TorchScript exporter supports "
            f"({OPSETS.start}-{OPSETS.stop - 1}); fused opset-23 ops come from `optimize`"
        )
    torch_dtype(dtype)  # validates the name before any slow work
    spec, config = source.spec, source.config
    float_dtype = numpy_dtype_name(dtype)
    inputs = spec.input_specs(config, float_dtype)
    outputs = spec.output_specs(config, float_dtype)
    with staged_output(out, force) as stage:
        model = source.load(dtype, attn_implementation)
        cast(Any, model).config.use_cache = False
        module = _export_module(model, [t.name for t in inputs], [t.name for t in outputs], dict(spec.forward_kwargs))
        feeds = sample_tensors(spec, config, inputs, TRACE_BATCH, TRACE_SEQUENCE)
        args = tuple(to_torch(feeds[t.name]) for t in inputs)
        scratch = stage / "export"
        scratch.mkdir()
        with step(f"exporting {source.display} to ONNX (TorchScript exporter, opset {opset})"):
            try:
                _torchscript_export(module, args, scratch / "model.onnx", inputs, outputs, opset)
            except Exception as exc:  # the exporter raises many types; name the cause, keep going no further
                raise BackendError(
                    f"torch.onnx export failed: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                ) from None
        del model, module
        proto = onnx.load(str(scratch / "model.onnx"), load_external_data=True)
        shutil.rmtree(scratch)
        _name_dims(proto, inputs, "input")
        _name_dims(proto, outputs, "output")
        proto.producer_name, proto.producer_version = "llm2trt", __version__
        with step("writing model.onnx and its external weights"):
            nbytes = save_onnx(proto, stage)
        logger.info("wrote %d nodes, %.1f MB of weights", len(proto.graph.node), nbytes / 1e6)
        manifest = Manifest(
            architecture=spec.name,
            model_type=str(config.model_type),
            model_class=spec.model_class(config),
            task=spec.task(config).task,
            dtype=dtype,
            opset=opset,
            inputs=inputs,
            outputs=outputs,
            main_output=outputs[0].name,
            dynamic_dims=spec.dim_ranges(config),
            source=source.info(),
            kv_cache=None,  # the logits graph: the KV-cache graph comes with the decode exporter
            attn_implementation=attn_implementation,
            exporter="torchscript",
            op_counts=op_counts(proto),
            model_config=config.to_diff_dict(),
        )
        manifest.write(stage)
    return manifest
