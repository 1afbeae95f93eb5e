"""compare: run the artifact under several runners through Polygraphy's Comparator.

The first runner is the reference (PyTorch by default). Tolerances come by dtype. The relative
error we report and check is normwise: max|out - ref| / max|ref| per output, so that an element of
the reference near zero does not make a correct graph look wrong. Polygraphy checks it elementwise
with atol = rtol * max|ref|, which is the same condition; `--atol` sets an absolute bound instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2trt.errors import BackendError, InputError
from llm2trt.log import step
from llm2trt.manifest import MODEL_NAME, Manifest

logger = logging.getLogger(__name__)

# Normwise relative tolerance by the artifact's dtype.
DEFAULT_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
DEFAULT_BATCH, DEFAULT_SEQUENCE = 3, 12


@dataclass
class OutputResult:
    reference: str
    runner: str
    output: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float  # normwise: max|a-b| / max|ref|
    elementwise_max_rel_err: float  # Polygraphy's max(|a-b| / |ref|): large where ref is near 0
    atol: float
    rtol: float
    passed: bool


@dataclass
class CompareResult:
    runners: list[str]
    main_output: str
    batch: int
    sequence: int
    rows: list[OutputResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def first_breach(self) -> dict[str, Any] | None:
        for row in self.rows:
            if not row.passed:
                return {"onnx_tensor": row.output, "module": None, "runner": row.runner, "max_rel_err": row.max_rel_err}
        return None

    def main_error(self) -> float:
        return max((r.max_rel_err for r in self.rows if r.output == self.main_output), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "runners": self.runners,
            "main_output": self.main_output,
            "main_max_rel_err": self.main_error(),
            "batch": self.batch,
            "sequence": self.sequence,
            "results": [asdict(r) for r in self.rows],
            "first_breach": self.first_breach(),
        }

    def table(self) -> str:
        header = ("reference", "runner", "output", "shape", "max_abs_err", "max_rel_err", "rtol", "status")
        lines = [header]
        breach_seen = False
        for r in self.rows:
            status = "ok" if r.passed else "FAIL"
            if not r.passed and not breach_seen:
                status, breach_seen = "FAIL <- first breach", True
            lines.append(
                (
                    r.reference,
                    r.runner,
                    r.output,
                    "x".join(map(str, r.shape)),
                    f"{r.max_abs_err:.3e}",
                    f"{r.max_rel_err:.3e}",
                    f"{r.rtol:.0e}",
                    status,
                )
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)


@contextlib.contextmanager
def polygraphy_quiet(verbosity: int) -> Iterator[None]:
    """Keep Polygraphy's log off stdout (it is ours for --json) and quiet unless -v."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbosity > 0 else G_LOGGER.ERROR
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


def onnx_path_of(directory: Path, manifest: Manifest) -> Path:
    """The ONNX file an artifact (or an engine directory, through its manifest) stands for."""
    path = directory / MODEL_NAME
    if path.is_file():
        return path
    onnx_dir = manifest.files.get("onnx_dir")
    if onnx_dir and (Path(onnx_dir) / MODEL_NAME).is_file():
        return Path(onnx_dir) / MODEL_NAME
    raise InputError(f"no {MODEL_NAME} for {directory}")


def _to_float_array(value: Any) -> np.ndarray:
    return np.asarray(value).astype(np.float64)


def compare(
    artifact: Path,
    runners: list[str] | None = None,
    *,
    batch: int = DEFAULT_BATCH,
    sequence: int = DEFAULT_SEQUENCE,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    verbosity: int = 0,
) -> CompareResult:
    from llm2trt.export import sample_tensors
    from llm2trt.runners import RUNNERS, ort_runner, torch_runner, trt_runner

    runners = runners or ["torch", "ort"]
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown or len(runners) < 2 or len(set(runners)) != len(runners):
        raise InputError(
            f"--runners takes two or more distinct names from {', '.join(RUNNERS)} (got {','.join(runners)})"
        )
    manifest = Manifest.read(artifact)
    onnx_path = onnx_path_of(artifact, manifest)
    spec, config = manifest.spec_and_config()
    if "sequence" in manifest.dynamic_dims:
        sequence = min(sequence, manifest.dynamic_dims["sequence"].max)
    feeds = sample_tensors(spec, config, manifest.inputs, batch, sequence, seed)
    built: list[Any] = []
    for name in runners:
        if name == "torch":
            built.append(torch_runner(manifest))
        elif name == "ort":
            built.append(ort_runner(onnx_path))
        else:
            built.append(trt_runner(artifact))
    rtol = rtol if rtol is not None else DEFAULT_RTOL[manifest.dtype]

    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.exception import PolygraphyException

    with polygraphy_quiet(verbosity):
        try:
            with step(f"running {', '.join(runners)} on batch {batch}, sequence {sequence}"):
                run_results = Comparator.run(built, data_loader=[feeds])
        except PolygraphyException as exc:
            raise BackendError(f"a runner failed: {str(exc).strip().splitlines()[-1]}") from None
        except Exception as exc:  # onnxruntime raises its own exception classes (NotImplemented, Fail, ...)
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"a runner failed: {text}") from None
        reference = dict(run_results[0][1][0])
        scales = {name: float(np.abs(_to_float_array(v)).max()) if np.size(v) else 0.0 for name, v in reference.items()}
        atols = {name: (atol if atol is not None else rtol * max(scale, 1e-30)) for name, scale in scales.items()}
        func = CompareFunc.simple(atol=atols, rtol=rtol, check_error_stat="elemwise")
        accuracy = Comparator.compare_accuracy(run_results, compare_func=func)
        # Polygraphy >= 0.53 returns one AccuracyResult per compare function; older ones return it bare.
        if not isinstance(accuracy, dict):
            accuracy = accuracy[0]

    result = CompareResult(runners=runners, main_output=manifest.main_output, batch=batch, sequence=sequence)
    outputs_order = [t.name for t in manifest.outputs]
    for (ref_name, runner_name), iterations in accuracy.items():
        per_output = iterations[0]
        other = dict(next(r for n, r in run_results if n == runner_name)[0])
        for output in outputs_order:
            if output not in per_output:
                continue
            res = per_output[output]
            scale = scales[output]
            result.rows.append(
                OutputResult(
                    reference=ref_name,
                    runner=runner_name,
                    output=output,
                    shape=list(np.shape(other[output])),
                    max_abs_err=float(res.max_absdiff),
                    max_rel_err=float(res.max_absdiff) / scale if scale > 0 else float(res.max_absdiff),
                    elementwise_max_rel_err=float(res.max_reldiff),
                    atol=atols[output],
                    rtol=rtol,
                    passed=bool(res),
                )
            )
    return result
