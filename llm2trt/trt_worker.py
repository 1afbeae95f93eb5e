"""Parse and build in a child process: TensorRT can abort or segfault on some graphs
(ENVIRONMENT.md), and a crash there must become a clear error, not a dead CLI.

Run as `python -m llm2trt.trt_worker REQUEST.json`; it writes RESULT.json named in the request.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from llm2trt.log import configure
from llm2trt.trt import Backend, load_backend

logger = logging.getLogger("llm2trt.trt")
PHASE_MARK = "[llm2trt-phase] "


def _make_logger(trt: Any, errors: list[str]) -> Any:
    class Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                errors.append(msg)
                logger.debug("TensorRT error: %s", msg)
            elif severity == trt.ILogger.WARNING:
                logger.debug("TensorRT warning: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return Logger()


def _make_progress(trt: Any) -> Any:
    class Progress(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._start[phase_name] = time.perf_counter()
            if parent_phase is None:
                logger.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            took = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            if took > 2.0:
                logger.info("TensorRT: %s done in %.1f s", phase_name, took)

    return Progress()


def _parse(backend: Backend, onnx_path: str, errors: list[str]) -> tuple[Any, Any, Any, Any]:
    trt = backend.module
    trt_logger = _make_logger(trt, errors)
    builder = trt.Builder(trt_logger)
    flags = 0
    if not backend.is_rtx:  # TensorRT-RTX networks are always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(onnx_path):
        details = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f" (node {err.node_name()!r}, op {err.node_operator()})" if err.node_name() else ""
            details.append(f"{err.desc()}{where}")
        raise RuntimeError("parse: " + ("; ".join(details) or (errors[-1] if errors else "unknown error")))
    return trt_logger, builder, network, parser


def allow_attention_decomposition(trt: Any, network: Any) -> int:
    """Let TensorRT decompose attention it has no fused kernel for (fp32, some shapes).

    Without this, an ONNX Attention node that no dedicated kernel covers fails the whole build
    ("Attention operation was not supported by a dedicated kernel"); with it, TensorRT still uses a
    fused kernel where one exists. Returns the number of attention ops.
    """
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer
        elif layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer
        else:
            continue
        # Both boundary layers lead to the same attention; setting it twice is harmless (and
        # Python wrapper ids are reused, so they cannot tell attentions apart).
        if layer.attention is not None:
            layer.attention.decomposable = True
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.ATTENTION_OUTPUT)


def build(request: dict[str, Any]) -> dict[str, Any]:
    backend = load_backend(request["backend"])
    trt = backend.module
    errors: list[str] = []
    start = time.perf_counter()
    trt_logger, builder, network, parser = _parse(backend, request["onnx"], errors)
    parse_seconds = time.perf_counter() - start
    logger.info("TensorRT parsed %d layers in %.1f s", network.num_layers, parse_seconds)
    # A protocol line for the parent, whatever the verbosity: it names the phase a crash hit.
    sys.stderr.write(f"{PHASE_MARK}build\n")
    sys.stderr.flush()
    attention_ops = allow_attention_decomposition(trt, network)

    config = builder.create_builder_config()
    config.progress_monitor = _make_progress(trt)
    for shapes in request["profiles"]:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in shapes:
                if any(d < 0 for d in tensor.shape):
                    raise RuntimeError(f"build: no profile shape for dynamic input {tensor.name!r}")
                continue
            lo, opt, hi = shapes[tensor.name]
            profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cc = request.get("compute_capability")
    if cc:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), 0)
    cache_info: dict[str, Any] | None = None
    cache = None
    if request.get("timing_cache"):  # full TensorRT only; the parent refuses it under RTX
        cache_path = Path(request["timing_cache"])
        before = cache_path.read_bytes() if cache_path.exists() else b""
        cache = config.create_timing_cache(before)
        config.set_timing_cache(cache, ignore_mismatch=False)
        cache_info = {"path": str(cache_path), "bytes_before": len(before)}
    if request.get("strip_weights"):  # full TensorRT only
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)

    build_start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - build_start
    if plan is None:
        raise RuntimeError("build: " + (errors[-1] if errors else "TensorRT returned no engine"))
    data = memoryview(plan)
    with open(request["engine"], "wb") as fh:
        fh.write(data)
    if cache is not None and cache_info is not None:
        blob = bytes(memoryview(cache.serialize()))
        Path(cache_info["path"]).write_bytes(blob)
        cache_info["bytes_after"] = len(blob)
        # A cache that was non-empty before and did not grow served every tactic: a hit.
        cache_info["hit"] = cache_info["bytes_before"] > 0 and len(blob) == cache_info["bytes_before"]
    del parser, trt_logger
    return {
        "ok": True,
        "backend": backend.name,
        "version": backend.version,
        "layers": network.num_layers,
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(build_seconds, 3),
        "engine_bytes": len(data),
        "timing_cache": cache_info,
        "attention_ops": attention_ops,
    }


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    configure(int(request.get("verbosity", 0)))
    try:
        result = build(request)
    except RuntimeError as exc:
        stage, _, message = str(exc).partition(": ")
        result = {"ok": False, "stage": stage, "error": message}
    Path(request["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
