"""Layer-output comparison: `compare --mark`, goldens, and `debug bisect`.

Every runner runs the graph once and streams its marked tensors (`taps`); each tensor is
compared as soon as every runner has produced it, then dropped, so memory holds about one
layer's activations per runner. Rows are judged by the artifact's tolerance profile (by dtype,
or quantized mode). The first runner is the reference.

`bisect` halves over the layers' outputs, marking one tensor per round (each runner stops once it
has produced it), then marks the module outputs of the first divergent layer once, and names the
first of them beyond tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from llm2trt.backends.base import Mark, Stream, Tap, Values
from llm2trt.backends.registry import BACKENDS, make_tap
from llm2trt.compare.driver import CompareResult, OutputResult, Setup, check_runner_names
from llm2trt.compare.golden import FORMAT, Golden, GoldenIndex, GoldenWriter
from llm2trt.compare.marks import GraphMap, fusion_splits
from llm2trt.core.errors import InputError
from llm2trt.core.log import plural, step
from llm2trt.core.records import Record
from llm2trt.core.tolerance import TolerancePolicy, errors, profile_for

logger = logging.getLogger(__name__)


def _pair(reference: Values, value: Values) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference and runner arrays to compare: a module may return several tensors (torch
    hands all of them back); the pair of equal size that agrees best is the counterpart."""
    pairs = [(r, v) for r in reference for v in value if r.size == v.size]
    if len(pairs) <= 1:
        return pairs[0] if pairs else None
    return min(pairs, key=lambda p: errors(p[1], p[0]).max_abs_err)


class GoldenTap(Tap):
    """A golden file as the reference runner."""

    def __init__(self, golden: Golden) -> None:
        self.name = "golden"
        self._golden = golden
        self._by_name = {t.name: t for t in golden.index.compared()}

    def provides(self, marks: Sequence[Mark]) -> set[str]:
        return {m.tensor for m in marks if m.tensor in self._by_name}

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        for m in marks:
            if m.tensor in self._by_name:
                yield m.tensor, [self._golden.array(self._by_name[m.tensor])]


Tolerances = Callable[[Mark], TolerancePolicy]


def _pull(stream: Stream, early: dict[str, Values], tensor: str) -> Values | None:
    """`tensor`'s values from a stream; what comes before it waits in `early` (a runner may
    produce in another order than the graph's, e.g. the model's outputs before the cache)."""
    if tensor in early:
        return early.pop(tensor)
    for name, values in stream:
        if name == tensor:
            return values
        early[name] = values
    return None


@dataclass
class Comparison:
    """Every tap streams the marks; each is compared as soon as all taps have produced it, then
    dropped. The first tap is the reference."""

    taps: list[Tap]
    feeds: dict[str, np.ndarray]
    tolerance: Tolerances
    atol: float | None = None
    golden: GoldenWriter | None = None
    rows: list[OutputResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    runs: int = 0  # how many times each runner ran the graph (bisect: once per round)

    def run(self, marks: Sequence[Mark]) -> list[OutputResult]:
        """Compare `marks` (graph order, graph outputs last) in one run of every tap."""
        self.runs += 1
        provides = [tap.provides(marks) for tap in self.taps]
        streams = [tap.stream(self.feeds, marks) for tap in self.taps]
        early: list[dict[str, Values]] = [{} for _ in self.taps]
        rows: list[OutputResult] = []
        try:
            for mark in marks:
                values = [
                    _pull(stream, waiting, mark.tensor) if mark.tensor in provided else None
                    for stream, waiting, provided in zip(streams, early, provides, strict=True)
                ]
                rows += self._judge(mark, values)
                if self.golden is not None and values[-1] is not None:
                    kind = "output" if mark.graph_output else "mark"
                    self.golden.add(mark.tensor, kind, values[-1][0], mark.module, self.tolerance(mark))
        finally:
            for stream in streams:
                stream.close()  # type: ignore[attr-defined]
        self.rows += rows
        return rows

    def _judge(self, mark: Mark, values: list[Values | None]) -> list[OutputResult]:
        reference = values[0]
        rows = []
        for tap, got in zip(self.taps[1:], values[1:], strict=True):
            pair = _pair(reference, got) if reference and got else None
            if pair is None:
                if mark.tensor not in self.skipped:
                    self.skipped.append(mark.tensor)
                continue
            ref, value = pair
            err = errors(value, ref)
            policy = self.tolerance(mark)
            rows.append(
                OutputResult(
                    reference=self.taps[0].name,
                    runner=tap.name,
                    output=mark.tensor,
                    shape=list(value.shape),
                    max_abs_err=err.max_abs_err,
                    max_rel_err=err.max_rel_err,
                    elementwise_max_rel_err=err.elementwise_max_rel_err,
                    atol=self.atol if self.atol is not None else policy.rtol * err.scale,
                    rtol=policy.rtol,
                    passed=policy.verdict(err.max_rel_err, err.max_abs_err, err.cosine, self.atol),
                    module=mark.module,
                    cosine=err.cosine,
                )
            )
        return rows


@contextmanager
def _taps(names: Sequence[str], setup: Setup, reference: Tap | None = None) -> Iterator[list[Tap]]:
    taps = [reference] if reference is not None else []
    try:
        for name in names:
            taps.append(make_tap(name, setup.ctx))
        yield taps
    finally:
        for tap in taps:
            tap.close()


def _graph_map(setup: Setup) -> GraphMap:
    path = setup.ctx.onnx_path()
    if not path.is_file():
        raise InputError(f"{setup.ctx.artifact} has no ONNX graph to mark ({path.name} is missing)")
    return GraphMap.of(onnx.load(str(path), load_external_data=False))


def _boundary_marks(setup: Setup, graph_map: GraphMap, marks: list[Mark], mode: str, runners: list[str]) -> list[Mark]:
    """For TensorRT, keep marks at fusion boundaries: `all` drops marks inside a fusion, an explicit
    pattern keeps them with a warning."""
    if "trt" not in runners or not marks:
        return marks
    splits = fusion_splits(setup.ctx.onnx_path(), graph_map, marks)
    for split in splits:
        logger.warning("%s%s", split.render(), " (not marked)" if mode == "all" else "")
    inside = {s.tensor for s in splits}
    return [m for m in marks if m.tensor not in inside] if mode == "all" else marks


def _writer(path: Path | None, setup: Setup, runner: str, seed: int) -> GoldenWriter | None:
    if path is None:
        return None
    index = GoldenIndex(FORMAT, runner, setup.graph.name, setup.graph.onnx_sha256, setup.batch, setup.sequence, seed)
    writer = GoldenWriter(path, index)
    for name, value in setup.feeds.items():
        writer.add(name, "input", value, None, None)
    return writer


def compare_marked(
    artifact: Path,
    runners: list[str],
    *,
    mark: str = "all",
    batch: int,
    sequence: int,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    save_golden: Path | None = None,
) -> CompareResult:
    """`compare --mark`: module outputs (or the pattern's tensors) and the graph's outputs, in
    graph order, round by round; `save_golden` keeps the last runner's tensors."""
    check_runner_names(runners)
    setup = Setup.of(artifact, batch, sequence, seed)
    graph_map = _graph_map(setup)
    marks = _boundary_marks(setup, graph_map, graph_map.select(mark), mark, runners)
    if mark == "all" and not graph_map.marks:
        logger.warning("the graph's node names carry no module scopes: only its outputs are compared")
    outputs = list(graph_map.outputs)
    policy = profile_for(setup.manifest.dtype).with_rtol(rtol)
    writer = _writer(save_golden, setup, runners[-1], seed)
    comparison = Comparison([], setup.feeds, lambda m: policy, atol, writer)
    try:
        with _taps(runners, setup) as taps:
            comparison.taps = taps
            with step(f"comparing {plural(len(marks), 'marked tensor')} and {plural(len(outputs), 'output')}"):
                comparison.run([*marks, *outputs])
            segments = max(tap.segments for tap in taps)
        if writer is not None:
            written = writer.close()
            logger.info("golden file %s: %.1f MB", written, written.stat().st_size / 1e6)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _result(setup, runners, comparison, len(marks), segments)


def _result(setup: Setup, runners: list[str], comparison: Comparison, marked: int, segments: int) -> CompareResult:
    if comparison.skipped:
        skipped = len(comparison.skipped)
        logger.warning(
            "%s no counterpart in every runner: not compared",
            f"{plural(skipped, 'marked tensor')} {'has' if skipped == 1 else 'have'}",
        )
    return CompareResult(
        runners=runners,
        main_output=setup.graph.main_output,
        batch=setup.batch,
        sequence=setup.sequence,
        rows=comparison.rows,
        marked=marked,
        segments=segments,
        skipped=comparison.skipped,
    )


def check_golden(
    artifact: Path,
    golden_path: Path,
    *,
    runner: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> CompareResult:
    """Re-run the golden's runner on its inputs; compare every tensor it holds with its tolerance."""
    golden = Golden(golden_path)
    try:
        index = golden.index
        runner = runner or index.runner
        BACKENDS.get(runner)  # an unknown name is one clear error
        setup = Setup.of(artifact, index.batch, index.sequence, index.seed)
        if index.graph != setup.graph.name:
            raise InputError(f"{golden_path} was saved from graph {index.graph!r}; {artifact} has {setup.graph.name!r}")
        setup = _with_feeds(setup, golden.feeds(), golden_path)
        if index.onnx_sha256 and setup.graph.onnx_sha256 and index.onnx_sha256 != setup.graph.onnx_sha256:
            logger.warning("%s was saved from another ONNX graph than %s's: checking it anyway", golden_path, artifact)
        marks, outputs = _golden_marks(_graph_map(setup), index, golden_path)
        tolerances = {t.name: t.tolerance for t in index.compared()}
        fallback = profile_for(setup.manifest.dtype)

        def tolerance(mark: Mark) -> TolerancePolicy:
            return (tolerances.get(mark.tensor) or fallback).with_rtol(rtol)

        comparison = Comparison([], setup.feeds, tolerance, atol)
        with _taps([runner], setup, reference=GoldenTap(golden)) as taps:
            comparison.taps = taps
            with step(f"checking {plural(len(marks), 'marked tensor')} and {plural(len(outputs), 'output')}"):
                comparison.run([*marks, *outputs])
            segments = max(tap.segments for tap in taps)
        return _result(setup, ["golden", runner], comparison, len(marks), segments)
    finally:
        golden.close()


def _with_feeds(setup: Setup, feeds: dict[str, np.ndarray], path: Path) -> Setup:
    want = [t.name for t in setup.graph.inputs]
    if sorted(feeds) != sorted(want):
        raise InputError(f"{path} holds inputs {', '.join(feeds)}; the graph takes {', '.join(want)}")
    return replace(setup, feeds={n: feeds[n] for n in want})


def _golden_marks(graph_map: GraphMap, index: GoldenIndex, path: Path) -> tuple[list[Mark], list[Mark]]:
    known = {m.tensor: m for m in [*graph_map.marks, *graph_map.outputs]}
    marks: list[Mark] = []
    outputs: list[Mark] = []
    for tensor in index.compared():
        mark = known.get(tensor.name)
        if mark is None and tensor.name in graph_map.produced:
            mark = Mark(tensor.name, tensor.module, None, graph_map.produced[tensor.name])
        if mark is None:
            raise InputError(f"{path} holds tensor {tensor.name!r}, which the artifact's graph does not produce")
        (outputs if mark.graph_output else marks).append(mark)
    return sorted(marks, key=lambda m: m.index), outputs


# -- bisect -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe(Record):
    tensors: list[str]
    breach: str | None  # the first tensor beyond tolerance this round


@dataclass(frozen=True)
class BisectResult(Record):
    onnx_tensor: str | None  # None: no divergence
    module: str | None
    max_rel_err: float | None
    rounds: int
    layers: int
    runners: list[str]
    probes: list[Probe] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.onnx_tensor is not None

    def render(self) -> str:
        if not self.diverged:
            rounds = f"{plural(self.rounds, 'round')} over {plural(self.layers, 'layer')}"
            return f"no divergence between {','.join(self.runners)} ({rounds})"
        return (
            f"first divergence: {self.module or '(no module)'}\n"
            f"  onnx tensor: {self.onnx_tensor}\n"
            f"  max relative error: {self.max_rel_err:.3e}\n"
            f"  rounds: {self.rounds} over {plural(self.layers, 'layer')}"
        )

    def message(self) -> str:
        return f"{self.onnx_tensor} (output of {self.module}) is the first tensor beyond tolerance"


def _first_failure(rows: list[OutputResult]) -> OutputResult | None:
    return next((r for r in rows if not r.passed), None)


def bisect(
    artifact: Path,
    runners: list[str] | None = None,
    *,
    batch: int,
    sequence: int,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> BisectResult:
    runners = runners or ["torch", "ort"]
    check_runner_names(runners)
    setup = Setup.of(artifact, batch, sequence, seed)
    graph_map = _graph_map(setup)
    policy = profile_for(setup.manifest.dtype).with_rtol(rtol)
    candidates = graph_map.layer_outputs()
    main = next(o for o in graph_map.outputs if o.tensor == setup.graph.main_output)
    if not candidates or candidates[-1].tensor != main.tensor:
        candidates.append(main)
    comparison = Comparison([], setup.feeds, lambda m: policy, atol)
    probes: list[Probe] = []

    def probe(marks: list[Mark]) -> OutputResult | None:
        with step(f"bisect round {comparison.runs + 1}: {plural(len(marks), 'tensor')}"):
            failed = _first_failure(comparison.run(marks))
        probes.append(Probe([m.tensor for m in marks], failed.output if failed else None))
        return failed

    with _taps(runners, setup) as taps:
        comparison.taps = taps
        lo, hi = 0, len(candidates)
        while lo < hi:
            mid = (lo + hi) // 2
            if probe([candidates[mid]]) is not None:
                hi = mid
            else:
                lo = mid + 1
        found = None
        if lo < len(candidates):
            after = candidates[lo - 1].index if lo > 0 else -1
            span = graph_map.between(after, candidates[lo].index)
            if candidates[lo] not in span:
                span.append(candidates[lo])
            found = probe(span) or _first_failure([r for r in comparison.rows if r.output == candidates[lo].tensor])
    layers = len(graph_map.layer_outputs())
    if found is None:
        return BisectResult(None, None, None, comparison.runs, layers, runners, probes)
    return BisectResult(found.output, found.module, found.max_rel_err, comparison.runs, layers, runners, probes)
