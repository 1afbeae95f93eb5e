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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.core.errors import BackendError, InputError, first_line
from llm2trt.core.log import plural, step
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.records import Record

if TYPE_CHECKING:
    from llm2trt.backends.base import RunnerContext

logger = logging.getLogger(__name__)

DEFAULT_BATCH, DEFAULT_SEQUENCE = 3, 12


@dataclass(frozen=True)
class OutputResult(Record):
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
    module: str | None = None  # the PyTorch module whose output the tensor is (marked compares)
    cosine: float | None = None


@dataclass(frozen=True)
class Breach(Record):
    """The first compared tensor beyond tolerance."""

    onnx_tensor: str
    module: str | None
    runner: str
    max_rel_err: float


@dataclass(frozen=True)
class CompareResult(Record):
    runners: list[str]
    main_output: str
    batch: int
    sequence: int
    rows: list[OutputResult] = field(default_factory=list)
    marked: int = 0  # intermediate tensors compared besides the outputs
    segments: int = 0  # marked compares: ONNX Runtime ran the graph once, cut into this many segments
    skipped: list[str] = field(default_factory=list)  # marks without a counterpart in some runner
    cache_outputs: list[str] = field(default_factory=list)  # a decoder's present.* outputs, summed up in text

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def first_breach(self) -> Breach | None:
        for row in self.rows:
            if not row.passed:
                return Breach(row.output, row.module, row.runner, row.max_rel_err)
        return None

    def main_error(self) -> float:
        return max((r.max_rel_err for r in self.rows if r.output == self.main_output), default=float("nan"))

    def breach_message(self) -> str:
        breach = self.first_breach()
        if breach is None:
            return "no breach"
        module = f" (output of {breach.module})" if breach.module else ""
        return (
            f"{breach.onnx_tensor}{module} differs between {','.join(self.runners)} beyond tolerance "
            f"(max relative error {breach.max_rel_err:.2e})"
        )

    def to_dict(self) -> dict[str, Any]:
        breach = self.first_breach()
        return {
            "passed": self.passed,
            "runners": self.runners,
            "main_output": self.main_output,
            "main_max_rel_err": self.main_error(),
            "batch": self.batch,
            "sequence": self.sequence,
            "results": [r.to_dict() for r in self.rows],
            "first_breach": breach.to_dict() if breach else None,
            "marked": self.marked,
            "segments": self.segments,
            "skipped": self.skipped,
        }

    def table(self, verbose: bool = True) -> str:
        """One row per compared tensor; unless `verbose`, the cache outputs of each runner as one row."""
        marked = any(r.cosine is not None for r in self.rows)
        header: tuple[str, ...] = ("reference", "runner", "output", "shape", "max_abs_err", "max_rel_err")
        if marked:
            header = ("reference", "runner", "module", "output", "shape", "max_rel_err", "cosine")
        header += ("rtol", "status")
        lines: list[tuple[str, ...]] = [header]
        first = self.first_breach()
        cache = set() if verbose else set(self.cache_outputs)
        summed: set[tuple[str, str]] = set()
        for r in self.rows:
            if r.output in cache:
                if (r.reference, r.runner) not in summed:
                    summed.add((r.reference, r.runner))
                    lines.append(self._cache_row(r.reference, r.runner, marked, first))
                continue
            status = "ok" if r.passed else "FAIL"
            if first is not None and (r.output, r.runner) == (first.onnx_tensor, first.runner):
                status = "FAIL <- first breach"
            shape = "x".join(map(str, r.shape))
            if marked:
                cosine = f"{r.cosine:.6f}" if r.cosine is not None else "-"
                errors = (f"{r.max_rel_err:.3e}", cosine, f"{r.rtol:.0e}")
                lines.append((r.reference, r.runner, r.module or "-", r.output, shape, *errors, status))
            else:
                errors = (f"{r.max_abs_err:.3e}", f"{r.max_rel_err:.3e}", f"{r.rtol:.0e}")
                lines.append((r.reference, r.runner, r.output, shape, *errors, status))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)

    def _cache_row(self, reference: str, runner: str, marked: bool, first: Breach | None) -> tuple[str, ...]:
        """The cache outputs one runner was compared on, as one row: their count, worst error, verdict."""
        rows = [
            r for r in self.rows if r.output in self.cache_outputs and (r.reference, r.runner) == (reference, runner)
        ]
        worst = max(rows, key=lambda r: r.max_rel_err)
        failed = sum(not r.passed for r in rows)
        status = "ok" if not failed else f"FAIL ({failed} of {len(rows)})"
        if first is not None and first.runner == runner and first.onnx_tensor in {r.output for r in rows}:
            status += f" <- first breach: {first.onnx_tensor}"
        name = f"present.* ({plural(len(rows), 'cache output')}; worst {worst.output})"
        rtol = f"{worst.rtol:.0e}"
        if marked:
            return (reference, runner, "-", name, "-", f"{worst.max_rel_err:.3e}", "-", rtol, status)
        abs_err = max(r.max_abs_err for r in rows)
        return (reference, runner, name, "-", f"{abs_err:.3e}", f"{worst.max_rel_err:.3e}", rtol, status)

    def render(self, verbose: bool = False) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        tail = ""
        if self.segments:
            marked, segments = plural(self.marked, "marked tensor"), plural(self.segments, "segment")
            tail = f" ({marked}; graph run once, in {segments})"
        if self.skipped:
            tail += f"; {plural(len(self.skipped), 'mark')} had no counterpart in every runner"
        lines = [self.table(verbose)]
        breach = self.first_breach()
        if breach is not None and breach.module:
            lines.append(f"first breach: {breach.onnx_tensor}, output of {breach.module}")
        lines.append(f"{verdict}: {self.main_output} max relative error {self.main_error():.2e}{tail}")
        return "\n".join(lines)


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


@dataclass(frozen=True)
class Setup:
    """What every comparison starts from: the artifact's default graph and its sample inputs."""

    manifest: Manifest
    graph: GraphSpec
    feeds: dict[str, np.ndarray]
    ctx: RunnerContext
    batch: int
    sequence: int  # capped by the graph's sequence range

    @classmethod
    def of(cls, artifact: Path, batch: int, sequence: int, seed: int) -> Setup:
        from llm2trt.backends.base import RunnerContext
        from llm2trt.convert.sources import spec_and_config

        manifest = Manifest.read(artifact)
        manifest.require_whole("compare")
        graph = manifest.graph()
        spec, config = spec_and_config(manifest)
        if "sequence" in graph.dims:
            sequence = min(sequence, graph.dims["sequence"].max)
        feeds = spec.sample_inputs(config, graph, batch, sequence, seed)
        return cls(manifest, graph, feeds, RunnerContext(artifact, manifest, graph), batch, sequence)


def check_runner_names(runners: list[str]) -> None:
    from llm2trt.backends.registry import BACKENDS

    unknown = [r for r in runners if r not in BACKENDS]
    if unknown or len(runners) < 2 or len(set(runners)) != len(runners):
        raise InputError(
            f"--runners takes two or more distinct names from {', '.join(BACKENDS)} (got {','.join(runners)})"
        )


def _run(built: list[Any], feeds: dict[str, np.ndarray], label: str) -> Any:
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    try:
        with step(f"running {label}"):
            return Comparator.run(built, data_loader=[feeds])
    except PolygraphyException as exc:
        raise BackendError(f"a runner failed: {str(exc).strip().splitlines()[-1]}") from None
    except Exception as exc:  # onnxruntime raises its own exception classes (NotImplemented, Fail, ...)
        raise BackendError(f"a runner failed: {first_line(exc)}") from None


def _accuracy(run_results: Any, atol: float | None, rtol: float) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Polygraphy's verdict per output, with atol = rtol * max|reference| unless --atol is given."""
    from polygraphy.comparator import Comparator, CompareFunc

    reference = dict(run_results[0][1][0])
    scales = {
        name: float(np.abs(np.asarray(v, dtype=np.float64)).max()) if np.size(v) else 0.0
        for name, v in reference.items()
    }
    atols = {name: (atol if atol is not None else rtol * max(scale, 1e-30)) for name, scale in scales.items()}
    func = CompareFunc.simple(atol=atols, rtol=rtol, check_error_stat="elemwise")
    accuracy = Comparator.compare_accuracy(run_results, compare_func=func)
    # Polygraphy >= 0.53 returns one AccuracyResult per compare function; older ones return it bare.
    return (accuracy if isinstance(accuracy, dict) else accuracy[0]), scales, atols


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
    from llm2trt.backends.registry import make_runner

    runners = runners or ["torch", "ort"]
    check_runner_names(runners)
    setup = Setup.of(artifact, batch, sequence, seed)
    manifest, graph, feeds, ctx, sequence = setup.manifest, setup.graph, setup.feeds, setup.ctx, setup.sequence
    built = [make_runner(name, ctx) for name in runners]
    rtol = rtol if rtol is not None else manifest.dtype.tolerance.compare
    with polygraphy_quiet(verbosity):
        run_results = _run(built, feeds, f"{', '.join(runners)} on batch {batch}, sequence {sequence}")
        accuracy, scales, atols = _accuracy(run_results, atol, rtol)
    cache = graph.kv_cache.present_names if graph.kv_cache is not None else []
    result = CompareResult(
        runners=runners, main_output=graph.main_output, batch=batch, sequence=sequence, cache_outputs=cache
    )
    outputs = dict(run_results)
    for (ref_name, runner_name), iterations in accuracy.items():
        per_output, values = iterations[0], dict(outputs[runner_name][0])
        for output in (t.name for t in graph.outputs if t.name in iterations[0]):
            res, scale = per_output[output], scales[output]
            result.rows.append(
                OutputResult(
                    reference=ref_name,
                    runner=runner_name,
                    output=output,
                    shape=list(np.shape(values[output])),
                    max_abs_err=float(res.max_absdiff),
                    max_rel_err=float(res.max_absdiff) / scale if scale > 0 else float(res.max_absdiff),
                    elementwise_max_rel_err=float(res.max_reldiff),
                    atol=atols[output],
                    rtol=rtol,
                    passed=bool(res),
                )
            )
    return result
