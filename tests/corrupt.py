"""Faults the tests plant in artifacts: a wrong weight (the library's own `corrupt_linear`, also what
scripts/measure_debug.py plants) and weights pointed elsewhere."""

from __future__ import annotations

from pathlib import Path

import onnx

from llm2trt.compare.faults import corrupt_linear

__all__ = ["corrupt_linear", "point_weights_at"]


def point_weights_at(artifact: Path, location: str) -> Path:
    """Rewrite every external-data location of the artifact's model.onnx to `location`."""
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(artifact / "model.onnx"))
    return artifact
