"""inspect: what an artifact holds, read from its manifest and its graph (weights not loaded)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2trt.core.artifact import load_onnx, op_counts
from llm2trt.core.dtypes import DType, name_of_onnx
from llm2trt.core.errors import InputError
from llm2trt.core.log import plural
from llm2trt.core.manifest import Manifest
from llm2trt.core.names import BUILD_NAME, REPORT_NAME
from llm2trt.core.records import Record, RecordError
from llm2trt.core.reports import BuildInfo, OptimizeReport, fusion_summary

# What a user taking the ONNX to Polygraphy or trtexec must know (README: "Building with
# Polygraphy or trtexec"); measured with TensorRT-RTX 1.7 and Polygraphy 0.53.
_ATTENTION_HINT = (
    "fp32 Attention builds in TensorRT-RTX 1.7 only when marked decomposable ('not supported by a dedicated "
    "kernel' otherwise); `llm2trt build` marks it; with `polygraphy convert` add --trt-network-postprocess-script "
    '"$(python -m llm2trt.build.worker --hook)"; trtexec has no such switch (untested here): use --dtype fp16'
)


@dataclass(frozen=True)
class IOView(Record):
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphView(Record):
    """One ONNX graph as read from its file."""

    onnx: str
    opset: int
    nodes: int
    op_counts: dict[str, int]
    inputs: list[IOView]
    outputs: list[IOView]
    weights_bytes: int = 0


@dataclass(frozen=True)
class InspectView(Record):
    """What `inspect` shows: the manifest, the default graph, and the reports beside them."""

    path: str
    manifest: Manifest | None = None
    graph: GraphView | None = None
    report: OptimizeReport | None = None
    build: BuildInfo | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # The graph's keys at the top level (onnx, nodes, op_counts, inputs, outputs, ...).
        data: dict[str, Any] = {"path": self.path}
        if self.manifest:
            data["manifest"] = self.manifest.to_dict()
        if self.graph:
            data.update(self.graph.to_dict())
        for key, value in (("report", self.report), ("build", self.build)):
            if value is not None:
                data[key] = value.to_dict()
        data["notes"] = self.notes
        return data

    def render(self) -> str:
        lines = _manifest_lines(self.path, self.manifest) if self.manifest else [f"onnx          {self.path}"]
        if self.graph:
            lines += _graph_lines(self.graph)
        if self.build:
            b = self.build
            lines.append(
                f"engine        {b.backend} {b.backend_version}, {b.compute_capability}, "
                f"{plural(b.network_layers, 'layer')}, {b.engine_bytes / 1e6:.1f} MB, built in {b.build_seconds:.1f} s"
            )
        lines += [f"note          {note}" for note in self.notes]
        return "\n".join(lines)


def _manifest_lines(path: str, m: Manifest) -> list[str]:
    kv = m.kv_cache
    kv_text = (
        f"{plural(kv.num_layers, 'layer')} x {plural(kv.num_kv_heads, 'head')} x {kv.head_dim} ({kv.layout})"
        if kv
        else "none"
    )
    src = m.source
    lines = [
        f"artifact      {path}",
        f"architecture  {m.architecture} ({m.model_class}, model_type {m.model_type})",
        f"task          {m.task}",
        f"dtype         {m.dtype.value}   opset {m.opset}   exporter {m.exporter}",
        f"source        {src.kind}: {src.location} (sha256 {src.sha256[:12]})",
        "graphs        " + ", ".join(f"{g.name} ({g.onnx})" for g in m.graphs.values()),
        f"kv cache      {kv_text}",
        "dims          " + ", ".join(f"{k}={v}" for k, v in m.dynamic_dims.items()),
    ]
    if kv:
        lines.append(f"cache forms   {_forms(m.architecture, m.model_config)}")
        if kv.windows:
            sliding = [i for i, w in enumerate(kv.windows) if w]
            lines.append(
                f"sliding       window {max(kv.windows)} on {plural(len(sliding), 'layer')} of {kv.num_layers}"
            )
    if m.passes:
        shown = [p.name + _counts(p.counts) for p in m.passes]
        lines.append("passes        " + ", ".join(shown))
    if m.fusions:
        lines.append(f"fusions       {fusion_summary(m.fusions, m.expected_fusions)} (found/expected)")
    if m.quantization is not None:
        lines.append(f"quantization  {m.quantization.render()}")
    if m.tensor_parallel is not None:
        lines.append(f"tensor para.  {m.tensor_parallel.render()}")
    if m.pipeline_parallel is not None:
        lines.append(f"pipeline par. {m.pipeline_parallel.render()}")
    lines += [
        f"adapter       {a.name}: rank {a.rank}, {plural(len(a.modules), 'layer')} (sha256 {a.sha256[:12]})"
        for a in m.adapters
    ]
    lora = m.graph().lora
    if lora is not None:
        lines.append(
            f"lora slots    {lora.slots} x rank {lora.max_rank} on {plural(len(lora.targets), 'linear layer')} "
            f"(inputs lora.<module>.a|b, {lora.slot_input})"
        )
    return lines


def _forms(architecture: str, config: dict[str, Any]) -> str:
    """The cache forms the architecture's graphs can take, and why any other cannot."""
    from llm2trt.exporters import EXPORTERS

    if architecture not in EXPORTERS:
        return "unknown architecture"
    spec = EXPORTERS.get(architecture)
    reasons: dict[str, list[str]] = {}
    for form, why in spec.refused_kv_forms(config).items():
        reasons.setdefault(why, []).append(form)
    refused = "".join(f"; not {', '.join(forms)}: {why}" for why, forms in reasons.items())
    return ", ".join(spec.kv_forms_for(config)) + refused


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{k}={v}" for k, v in counts.items() if v]
    return f"({', '.join(shown)})" if shown else ""


def _graph_lines(g: GraphView) -> list[str]:
    io = [("input", t) for t in g.inputs] + [("output", t) for t in g.outputs]
    lines = [f"{kind:<13} {t.name}: {t.dtype}[{', '.join(map(str, t.shape))}]" for kind, t in io]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(g.op_counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"nodes         {g.nodes}: {ops}")
    if g.weights_bytes:
        lines.append(f"weights       {g.weights_bytes / 1e6:.1f} MB (external data)")
    return lines


def _io(values: Any) -> list[IOView]:
    rows = []
    for value in values:
        ttype = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in ttype.shape.dim]
        rows.append(IOView(value.name, name_of_onnx(ttype.elem_type), shape))
    return rows


def graph_view(onnx_path: Path, external_data: Sequence[Path] = ()) -> GraphView:
    model = load_onnx(onnx_path, with_weights=False)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphView(
        onnx=str(onnx_path),
        opset=opset,
        nodes=len(model.graph.node),
        op_counts=op_counts(model),
        inputs=_io(model.graph.input),
        outputs=_io(model.graph.output),
        weights_bytes=sum(f.stat().st_size for f in external_data if f.exists()),
    )


def _read(cls: type[Any], path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return cls.read(path)
    except (OSError, RecordError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def inspect(path: Path, verify: bool = False) -> InspectView:
    """What an artifact (or a bare .onnx file) holds; with `verify`, its weights checked against
    the sha256 recorded when they were written."""
    if path.is_file() and path.suffix == ".onnx":
        return InspectView(str(path), graph=graph_view(path))
    manifest = Manifest.read(path)
    graph = manifest.graph()
    onnx_path = Path(os.path.normpath(path / graph.onnx))
    data = [Path(os.path.normpath(path / f)) for f in graph.external_data]
    view = graph_view(onnx_path, data) if onnx_path.is_file() else None
    notes = []
    if verify:
        checked = manifest.verify_weights(path)
        recorded = len(graph.external_data_sha256)
        notes.append(
            f"weights verified: {recorded} file(s), {checked / 1e6:,.1f} MB match their recorded sha256"
            if recorded
            else "weights not verified: this artifact records no sha256 (written before llm2trt recorded them)"
        )
    if manifest.dtype is DType.FP32 and graph.fusions.get("Attention"):
        notes.append(_ATTENTION_HINT)
    return InspectView(
        str(path), manifest, view, _read(OptimizeReport, path / REPORT_NAME), _read(BuildInfo, path / BUILD_NAME), notes
    )
