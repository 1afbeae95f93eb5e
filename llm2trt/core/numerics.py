"""Numeric checks shared by optimize (graph before vs after) and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm2trt.core.errors import BackendError, first_line


def normwise_rel_err(value: np.ndarray, reference: np.ndarray) -> float:
    """max|value - reference| / max|reference| (0 when both are all zeros)."""
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if value.shape != reference.shape:
        return float("inf")
    if value.size == 0:
        return 0.0
    scale = float(np.abs(reference).max())
    diff = float(np.abs(value - reference).max())
    if np.isnan(diff):
        return float("inf")
    return diff / scale if scale > 0 else diff


def run_ort(
    path: Path | bytes,
    feeds: dict[str, np.ndarray],
    providers: list[str] | None = None,
    disable_optimizations: bool = False,
) -> dict[str, np.ndarray]:
    """Run an ONNX file (external data next to it) or serialized model in ONNX Runtime."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its optimizer's notes are not ours to print
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if disable_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    try:
        session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as exc:  # onnxruntime raises its own exception types for load and run failures
        where = path if isinstance(path, Path) else "the model"
        raise BackendError(f"ONNX Runtime failed on {where}: {first_line(exc)}") from None
