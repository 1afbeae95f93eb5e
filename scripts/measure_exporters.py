"""Measure torch.onnx's two exporters on the tiny specs: time, nodes, error vs PyTorch, batch > 1.

This is the measurement behind README's "Why the TorchScript exporter". Run:
    python scripts/measure_exporters.py
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.export import _export_module, sample_tensors, to_torch
from llm2trt.models import resolve_model


def export(kind: str, name: str, work: Path) -> tuple[float, int, float, str, str]:
    source = resolve_model(f"tiny:{name}")
    spec, config = source.spec, source.config
    inputs, outputs = spec.input_specs(config, "float32"), spec.output_specs(config, "float32")
    model = source.load("fp32", "sdpa")
    module = _export_module(model, [t.name for t in inputs], [t.name for t in outputs], dict(spec.forward_kwargs))
    feeds = sample_tensors(spec, config, inputs, 2, 8)
    args = tuple(to_torch(feeds[t.name]) for t in inputs)
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in [*inputs, *outputs]}
    path = work / f"{kind}-{name}.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=list(axes)[: len(inputs)],
                output_names=[t.name for t in outputs],
                dynamic_axes=axes,
            )
        else:
            dims = {d: torch.export.Dim.DYNAMIC for t in inputs for d in t.shape if isinstance(d, str)}
            shapes = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in inputs)
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=23,
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                dynamic_shapes={"args": shapes},
                verbose=False,
            )
    seconds = time.perf_counter() - start
    proto = onnx.load(str(path), load_external_data=False)
    dims = ",".join(d.dim_param or str(d.dim_value) for d in proto.graph.input[0].type.tensor_type.shape.dim)
    check = sample_tensors(spec, config, inputs, 3, 12, seed=1)
    with torch.no_grad():
        ref = model(**{k: to_torch(v) for k, v in check.items()}, **spec.forward_kwargs)
    try:
        got = run_ort(path, check)
        err = normwise_rel_err(got[outputs[0].name], ref[outputs[0].name].numpy())
        status = "ok"
    except Exception as exc:
        err, status = float("nan"), str(exc)[:60]
    return seconds, len(proto.graph.node), err, dims, status


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt2", "llama", "bert", "vit"):
            for kind in ("torchscript", "dynamo"):
                seconds, nodes, err, dims, status = export(kind, name, Path(tmp))
                rows.append((name, kind, f"{seconds:.1f}", str(nodes), f"{err:.1e}", dims, status))
    header = ("model", "exporter", "export s", "nodes", "rel err b3 s12", "input dims", "ORT at batch 3")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    ts = [float(r[2]) for r in rows if r[1] == "torchscript"]
    dy = [float(r[2]) for r in rows if r[1] == "dynamo"]
    print(f"export time ratio dynamo / torchscript: {np.sum(dy) / max(np.sum(ts), 1e-9):.1f}x")


if __name__ == "__main__":
    main()
