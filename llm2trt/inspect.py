"""inspect: what an artifact holds, read from its manifest and its graph (weights not loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm2trt.artifact import load_onnx
from llm2trt.errors import InputError
from llm2trt.export import op_counts
from llm2trt.manifest import BUILD_NAME, MODEL_NAME, REPORT_NAME, Manifest


def _io(values: Any) -> list[dict[str, Any]]:
    import onnx

    rows = []
    for value in values:
        ttype = value.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in ttype.shape.dim]
        rows.append(
            {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name, "shape": shape}
        )
    return rows


def inspect(path: Path) -> dict[str, Any]:
    if path.is_file() and path.suffix == ".onnx":
        model = load_onnx(path, with_weights=False)
        return {
            "onnx": str(path),
            "opset": _opset(model),
            "nodes": len(model.graph.node),
            "op_counts": op_counts(model),
            "inputs": _io(model.graph.input),
            "outputs": _io(model.graph.output),
        }
    manifest = Manifest.read(path)
    info: dict[str, Any] = {"path": str(path), "manifest": manifest.to_dict()}
    model_path = path / MODEL_NAME
    if model_path.is_file():
        model = load_onnx(model_path, with_weights=False)
        data = [path / f for f in manifest.files.get("external_data", []) if (path / f).exists()]
        info.update(
            {
                "nodes": len(model.graph.node),
                "op_counts": op_counts(model),
                "inputs": _io(model.graph.input),
                "outputs": _io(model.graph.output),
                "weights_bytes": sum(f.stat().st_size for f in data),
            }
        )
    for name, key in ((REPORT_NAME, "report"), (BUILD_NAME, "build")):
        if (path / name).is_file():
            try:
                info[key] = json.loads((path / name).read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"cannot read {path / name}: {exc}") from None
    return info


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def render(info: dict[str, Any]) -> str:
    """The human-readable view of `inspect`'s result."""
    lines: list[str] = []
    manifest = info.get("manifest")
    if manifest:
        kv = manifest["kv_cache"]
        kv_text = (
            f"{kv['num_layers']} layers x {kv['num_kv_heads']} heads x {kv['head_dim']} ({kv['layout']})"
            if kv
            else "none"
        )
        lines += [
            f"artifact      {info['path']}",
            f"architecture  {manifest['architecture']} ({manifest['model_class']}, "
            f"model_type {manifest['model_type']})",
            f"task          {manifest['task']}",
            f"dtype         {manifest['dtype']}   opset {manifest['opset']}   exporter {manifest['exporter']}",
            f"source        {manifest['source']['kind']}: {manifest['source']['location']} "
            f"(sha256 {manifest['source']['sha256'][:12]})",
            f"kv cache      {kv_text}",
            "dims          "
            + ", ".join(f"{k}={v['min']}:{v['opt']}:{v['max']}" for k, v in manifest["dynamic_dims"].items()),
        ]
        if manifest["passes"]:
            lines.append(
                "passes        "
                + ", ".join(
                    p["name"]
                    + (
                        "(" + ", ".join(f"{k}={v}" for k, v in p["counts"].items() if v) + ")"
                        if any(p["counts"].values())
                        else ""
                    )
                    for p in manifest["passes"]
                )
            )
        if manifest.get("fusions"):
            expected = manifest.get("expected_fusions", {})
            shown = [
                f"{k} {v}/{expected[k]}" if k in expected else f"{k} {v}"
                for k, v in manifest["fusions"].items()
                if v or k in expected
            ]
            lines.append("fusions       " + (", ".join(shown) or "none") + " (found/expected)")
    for key in ("inputs", "outputs"):
        for t in info.get(key, []):
            lines.append(f"{key[:-1]:<13} {t['name']}: {t['dtype']}[{', '.join(map(str, t['shape']))}]")
    if "nodes" in info:
        lines.append(
            f"nodes         {info['nodes']}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items(), key=lambda kv: -kv[1]))
        )
    if "weights_bytes" in info:
        lines.append(f"weights       {info['weights_bytes'] / 1e6:.1f} MB (external data)")
    build = info.get("build")
    if build:
        lines.append(
            f"engine        {build['backend']} {build['backend_version']}, {build['compute_capability']}, "
            f"{build['network_layers']} layers, {build['engine_bytes'] / 1e6:.1f} MB, "
            f"built in {build['build_seconds']:.1f} s"
        )
    return "\n".join(lines)
