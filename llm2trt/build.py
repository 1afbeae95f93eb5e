"""build: an ONNX artifact to a TensorRT engine, parsed and built in a child process."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llm2trt.artifact import check_artifact_files, check_output, load_onnx, staged_output
from llm2trt.errors import BackendError, InputError
from llm2trt.manifest import BUILD_NAME, ENGINE_NAME, DimRange, Manifest, PassRecord
from llm2trt.trt import load_backend, resolve_compute_capability
from llm2trt.trt_worker import PHASE_MARK

logger = logging.getLogger(__name__)


def parse_dim_overrides(values: tuple[str, ...] | list[str]) -> dict[str, DimRange]:
    """`--profile sequence=1:256:2048` (or `batch=4` for a fixed dim) -> ranges by dim name."""
    ranges: dict[str, DimRange] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        parts = spec.split(":")
        if not sep or not name or len(parts) not in (1, 3) or not all(p.isdigit() for p in parts):
            raise InputError(f"bad --profile {value!r}: expected DIM=MIN:OPT:MAX or DIM=N, e.g. sequence=1:128:512")
        nums = [int(p) for p in parts] * (3 if len(parts) == 1 else 1)
        ranges[name] = DimRange(*nums)
    return ranges


def profile_shapes(manifest: Manifest, dims: dict[str, DimRange]) -> dict[str, list[list[int]]]:
    """min/opt/max shapes for every dynamic graph input, from the ranges of its named dims."""
    shapes: dict[str, list[list[int]]] = {}
    for spec in manifest.inputs:
        if not spec.symbolic_dims():
            continue
        triple: list[list[int]] = [[], [], []]
        for dim in spec.shape:
            if isinstance(dim, int):
                for shape in triple:
                    shape.append(dim)
                continue
            if dim not in dims:
                raise InputError(f"input {spec.name!r} has dim {dim!r} with no range; pass --profile {dim}=MIN:OPT:MAX")
            rng = dims[dim]
            for shape, n in zip(triple, (rng.min, rng.opt, rng.max), strict=True):
                shape.append(n)
        shapes[spec.name] = triple
    return shapes


def _run_worker(request: dict[str, Any], scratch: Path) -> dict[str, Any]:
    request_path, result_path = scratch / "request.json", scratch / "result.json"
    request["result"] = str(result_path)
    request_path.write_text(json.dumps(request))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm2trt.trt_worker", str(request_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=40)
    phase = "parse"
    for line in proc.stderr or ():
        if line.startswith(PHASE_MARK):
            phase = line[len(PHASE_MARK) :].strip()
        elif line.startswith("[llm2trt] "):
            logger.info("%s", line[len("[llm2trt] ") :].rstrip())
        elif line.strip():
            tail.append(line.rstrip())
    code = proc.wait()
    if code < 0:
        name = signal.Signals(-code).name
        native = next((t for t in reversed(tail) if "Traceback" not in t), "")
        raise BackendError(
            f"TensorRT crashed ({name}) while it {'parsed' if phase == 'parse' else 'built'} "
            f"{request['onnx']}" + (f": {native}" if native else "")
        )
    if not result_path.exists():
        last = tail[-1] if tail else f"exit code {code}"
        raise BackendError(f"TensorRT {phase} failed: {last}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    if not result["ok"]:
        verb = "could not parse" if result["stage"] == "parse" else "could not build"
        raise BackendError(f"TensorRT {verb} {request['onnx']}: {result['error']}")
    return result


def build(
    artifact: Path,
    out: Path,
    *,
    compute_capability: str | None = None,
    profile: tuple[str, ...] | list[str] = (),
    timing_cache: Path | None = None,
    strip_weights: bool = False,
    backend: str = "auto",
    force: bool = False,
    verbosity: int = 0,
) -> dict[str, Any]:
    manifest = Manifest.read(artifact)
    onnx_path = check_artifact_files(artifact)
    load_onnx(onnx_path, with_weights=False)  # a clear error for a corrupt file before TensorRT sees it
    trt_backend = load_backend(backend)
    if timing_cache is not None:
        trt_backend.require("timing_cache")
    if strip_weights:
        trt_backend.require("strip_weights")
    cc = resolve_compute_capability(trt_backend, compute_capability)
    overrides, graph_dims = parse_dim_overrides(profile), manifest.symbolic_dims()
    unknown = set(overrides) - graph_dims
    if unknown:
        raise InputError(f"--profile names unknown dims {sorted(unknown)}; this model's dims are {sorted(graph_dims)}")
    dims = {**manifest.dynamic_dims, **overrides}
    shapes = profile_shapes(manifest, dims)
    check_output(out, force, reads=[artifact])
    with staged_output(out, force) as stage:
        scratch = stage / ".worker"
        scratch.mkdir()
        request = {
            "backend": trt_backend.name,
            "onnx": str(onnx_path.resolve()),
            "engine": str(stage / ENGINE_NAME),
            "profiles": [shapes],
            "compute_capability": cc,
            "strip_weights": strip_weights,
            "timing_cache": str(timing_cache.resolve()) if timing_cache else None,
            "verbosity": verbosity,
        }
        start = time.perf_counter()
        result = _run_worker(request, scratch)
        shutil.rmtree(scratch)
        info = {
            "backend": trt_backend.name,
            "backend_version": trt_backend.version,
            "precision": manifest.dtype,
            "strongly_typed": True,
            "compute_capability": cc or "current-gpu",
            "dims": {name: asdict(rng) for name, rng in dims.items() if name in graph_dims},
            "optimization_profiles": [{name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in shapes.items()}],
            "plugins": [],
            "timing_cache": result["timing_cache"],
            "strip_weights": strip_weights,
            "parse_seconds": result["parse_seconds"],
            "build_seconds": result["build_seconds"],
            "total_seconds": round(time.perf_counter() - start, 3),
            "engine_bytes": result["engine_bytes"],
            "network_layers": result["layers"],
            "attention_ops": result["attention_ops"],
            "onnx": str(onnx_path.resolve()),
            "fusions": manifest.fusions,
        }
        (stage / BUILD_NAME).write_text(json.dumps(info, indent=2) + "\n")
        record = PassRecord(
            "tensorrt_build", True, {"network_layers": result["layers"]}, result["build_seconds"], stage="build"
        )
        engine_manifest = manifest.with_passes([record])
        engine_manifest.files = {**manifest.files, "engine": ENGINE_NAME, "onnx_dir": str(artifact.resolve())}
        engine_manifest.write(stage)
    return info
