"""Measure torch.onnx's two exporters on the tiny specs: time, nodes, error vs PyTorch, batch > 1.

This is the measurement behind docs/architectures.md, "Why the TorchScript exporter". Run:
    python scripts/measure_exporters.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from common import print_columns

from llm2trt.convert.export import export_module, torchscript_export
from llm2trt.convert.sources import ModelSource, resolve_model
from llm2trt.core.dtypes import DType, to_torch
from llm2trt.core.manifest import GraphSpec
from llm2trt.core.numerics import normwise_rel_err, run_ort

MODELS = ("gpt2", "llama", "bert", "vit")
EXPORTERS = ("torchscript", "dynamo")


def _dynamo_export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, graph: GraphSpec) -> None:
    dims = {d: torch.export.Dim.DYNAMIC for t in graph.inputs for d in t.symbolic_dims()}
    shapes = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in graph.inputs)
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=True,
        opset_version=23,
        input_names=[t.name for t in graph.inputs],
        output_names=[t.name for t in graph.outputs],
        dynamic_shapes={"args": shapes},
        verbose=False,
    )


def _check_batch3(source: ModelSource, graph: GraphSpec, module: Any, path: Path) -> tuple[float, str]:
    """Normwise error of the first output against PyTorch at batch 3, sequence 12 (not the traced 2 x 8).
    The reference is the exported module itself: it takes the graph's inputs (a KV cache included)."""
    check = source.spec.sample_inputs(source.config, graph, 3, 12, seed=1)
    with torch.no_grad():
        ref = module(*(to_torch(check[t.name]) for t in graph.inputs))
    try:
        got = run_ort(path, check)
        return normwise_rel_err(got[graph.outputs[0].name], ref[0].numpy()), "ok"
    except Exception as exc:
        return float("nan"), str(exc)[:60]


def export(kind: str, name: str, work: Path) -> tuple[float, int, float, str, str]:
    source = resolve_model(f"tiny:{name}")
    spec, config = source.spec, source.config
    graph = spec.graph_spec(config, DType.FP32)
    model = source.load(DType.FP32, "sdpa")
    module = export_module(model, graph, dict(spec.forward_kwargs))
    feeds = spec.sample_inputs(config, graph, 2, 8)
    args = tuple(to_torch(feeds[t.name]) for t in graph.inputs)
    path = work / f"{kind}-{name}.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript":  # what `llm2trt convert` runs, export-time patches included
            torchscript_export(module, args, path, graph, 17)
        else:
            _dynamo_export(module, args, path, graph)
    seconds = time.perf_counter() - start
    proto = onnx.load(str(path), load_external_data=False)
    dims = ",".join(d.dim_param or str(d.dim_value) for d in proto.graph.input[0].type.tensor_type.shape.dim)
    err, status = _check_batch3(source, graph, module, path)
    return seconds, len(proto.graph.node), err, dims, status


def print_rows(rows: list[tuple[str, ...]]) -> None:
    header = ("model", "exporter", "export s", "nodes", "rel err b3 s12", "input dims", "ORT at batch 3")
    print_columns([header, *rows])
    ts = [float(r[2]) for r in rows if r[1] == "torchscript"]
    dy = [float(r[2]) for r in rows if r[1] == "dynamo"]
    print(f"export time ratio dynamo / torchscript: {np.sum(dy) / max(np.sum(ts), 1e-9):.1f}x")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if importlib.util.find_spec("onnxscript") is None:
        sys.exit("torch.onnx's dynamo exporter needs onnxscript, which is not installed: pip install onnxscript")
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for kind in EXPORTERS:
                seconds, nodes, err, dims, status = export(kind, name, Path(tmp))
                rows.append((name, kind, f"{seconds:.1f}", str(nodes), f"{err:.1e}", dims, status))
    print_rows(rows)


if __name__ == "__main__":
    main()
