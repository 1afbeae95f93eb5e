"""A known fault to plant: one weight of one module's linear layer made wrong, in a copy of an artifact.
What the layer-debugging tools (`compare --mark`, `debug bisect`) are checked against: they must
name that module."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from llm2trt.compare.marks import node_module
from llm2trt.core.artifact import external_info
from llm2trt.core.errors import InputError


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
        info = external_info(weights[0])
        offset, length = int(info["offset"]), int(info["length"])
        with open(out / info["location"], "r+b") as fh:
            fh.seek(offset)
            w = np.frombuffer(fh.read(length), dtype=np.float32).copy()
            w[len(w) // 3] += scale * float(np.abs(w).max())
            fh.seek(offset)
            fh.write(w.tobytes())
        return out
    raise InputError(f"no linear weight in {module}")
