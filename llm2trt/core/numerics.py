"""Numeric checks shared by optimize (graph before vs after) and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llm2trt.core.errors import BackendError, first_line
from llm2trt.core.tolerance import errors


def normwise_rel_err(value: np.ndarray, reference: np.ndarray) -> float:
    """max|value - reference| / max|reference| (0 when both are all zeros; inf for other shapes)."""
    value, reference = np.asarray(value), np.asarray(reference)
    if value.shape != reference.shape:
        return float("inf")
    return errors(value, reference).max_rel_err


def ort_session(
    model: Path | str | bytes,
    providers: list[str] | None = None,
    *,
    what: str | None = None,
    weights_folder: Path | None = None,
    arena: bool = True,
    disable_optimizations: bool = False,
    threads: int | None = None,
    prepack: bool = True,
) -> Any:
    """A quiet ONNX Runtime session; a load failure is one BackendError line naming `what`.

    `weights_folder`: where the external data of a model given as bytes lives. `arena`: off for a
    session that runs once (the arena only holds memory then). `threads`: intra-op threads (a share
    of the cores, when several processes run at once). `prepack`: off for a session that runs a few
    times (its weights' packed copies cost memory and load time: 160 MB over 134 MB segments)."""
    import onnxruntime as ort

    # Its optimizer's notes are not ours to print, nor its errors: they come back as exceptions,
    # which the caller turns into one line naming the cause.
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    if disable_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ONNX Runtime turns DequantizeLinear -> MatMul into MatMulNBits, which by default quantizes the
    # activations to int8 as well (accuracy level 4): weight-only graphs would not compute what they
    # say (measured: 6e-3 relative on tiny:llama int8-wo). Level 1 computes in fp32.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if weights_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_folder))
    source = model if isinstance(model, bytes) else str(model)
    missing = [p for p in providers or [] if p not in ort.get_available_providers()]
    if missing:  # ONNX Runtime would fall back to the CPU without a word
        raise BackendError(
            f"this ONNX Runtime has no {missing[0]} (--provider cuda needs onnxruntime-gpu: the `gpu` extra, README)"
        )
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = what or (model if not isinstance(model, bytes) else "the model")
        raise BackendError(f"ONNX Runtime cannot load {where}: {first_line(exc)}") from None


def run_ort(
    path: Path | bytes,
    feeds: dict[str, np.ndarray],
    providers: list[str] | None = None,
    disable_optimizations: bool = False,
) -> dict[str, np.ndarray]:
    """Run an ONNX file (external data next to it) or serialized model in ONNX Runtime."""
    session = ort_session(path, providers, disable_optimizations=disable_optimizations)
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as exc:  # onnxruntime raises its own exception types
        where = path if isinstance(path, Path) else "the model"
        raise BackendError(f"ONNX Runtime failed on {where}: {first_line(exc)}") from None


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64, stable log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(x).sum(axis=-1))
    picked = x[np.arange(len(ids) - 1), ids[1:]]
    return float((log_norm - picked).sum())
