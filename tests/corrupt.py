"""Corrupt one weight of one module's linear in an artifact (a copy): the layer-debugging tests'
known fault."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from llm2trt.compare.marks import node_module


def corrupt_linear(artifact: Path, module: str, out: Path, scale: float = 10.0) -> Path:
    """Copy `artifact` to `out` and add `scale` x max|W| to one element of `module`'s weight.

    The weight is the 2-D initializer a MatMul/Gemm in the module's scope reads; its bytes are
    patched in place in the external data file, so the graph itself is untouched.
    """
    shutil.copytree(artifact, out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node_module(node) != module or node.op_type not in ("MatMul", "Gemm"):
            continue
        weights = [inits[name] for name in node.input if name in inits and len(inits[name].dims) == 2]
        if not weights:
            continue
        info = {e.key: e.value for e in weights[0].external_data}
        data = out / info["location"]
        offset, length = int(info["offset"]), int(info["length"])
        with open(data, "r+b") as fh:
            fh.seek(offset)
            w = np.frombuffer(fh.read(length), dtype=np.float32).copy()
            w[len(w) // 3] += scale * float(np.abs(w).max())
            fh.seek(offset)
            fh.write(w.tobytes())
        return out
    raise AssertionError(f"no linear weight in {module}")


def point_weights_at(artifact: Path, location: str) -> Path:
    """Rewrite every external-data location of the artifact's model.onnx to `location`."""
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(artifact / "model.onnx"))
    return artifact
