"""build: an ONNX artifact to a TensorRT engine, parsed and built in a child process.

The child (`llm2trt.build.worker`) runs in its own session: an interrupt of the CLI (Ctrl-C,
SIGTERM) stops it here, and Linux kills it if the CLI itself is killed, so no build outlives
the command and no engine lands in a staging directory that is being removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm2trt.backends.tensorrt.adapter import Backend, load_backend, resolve_compute_capability
from llm2trt.build.worker import PHASE_MARK, PHASES, PROGRESS_MARK, BuildRequest, BuildResult
from llm2trt.core.artifact import load_onnx, save_beside, sha256_files, staged_output
from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.kv import CACHE_SEQUENCE, PAST_SEQUENCE, SEQUENCE, TOTAL_SEQUENCE
from llm2trt.core.log import plural, step
from llm2trt.core.manifest import DimRange, GraphSpec, Manifest, PassRecord
from llm2trt.core.names import BUILD_NAME, ENGINE_NAME
from llm2trt.core.pp import PipelineParallel
from llm2trt.core.records import Record, RecordError
from llm2trt.core.reports import BuildInfo, Profile, ShapeRange
from llm2trt.core.tp import TensorParallel
from llm2trt.plugins import refs as plugin_refs

logger = logging.getLogger(__name__)

MAX_OPT_LEVEL = 5
# After SIGTERM, how long the worker gets before SIGKILL.
_KILL_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Built(Record):
    """What `build` wrote: build.json's content, and where."""

    output: str
    info: BuildInfo

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, **self.info.to_dict()}

    def render(self) -> str:
        return self.info.describe(str(Path(self.output) / self.info.engine))


def parse_dim_overrides(values: tuple[str, ...] | list[str]) -> dict[str, DimRange]:
    """`--profile sequence=1:256:2048` (or `batch=4` for a fixed dim) -> ranges by dim name."""
    ranges: dict[str, DimRange] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        parts = spec.split(":")
        # ASCII digits, 18 at most (an int64): isdigit() alone takes "²", and int() refuses 4300+ digits.
        numbers = all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts)
        if not sep or not name or len(parts) not in (1, 3) or not numbers:
            raise InputError(f"bad --profile {value!r}: expected DIM=MIN:OPT:MAX or DIM=N, e.g. sequence=1:128:512")
        nums = [int(p) for p in parts] * (3 if len(parts) == 1 else 1)
        ranges[name] = DimRange(*nums)
    return ranges


def load_profiles(path: Path) -> dict[str, dict[str, DimRange]]:
    """A profiles file: {"profiles": [{"name": "short", "dims": {"sequence": "1:64:128"}}, ...]};
    each entry one optimization profile (a dim given as N is fixed), in order."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
        raise InputError(f"--profiles {path}: cannot read it as JSON ({exc})") from None
    entries = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f'--profiles {path}: expected {{"profiles": [{{"name": ..., "dims": {{...}}}}, ...]}}')
    profiles: dict[str, dict[str, DimRange]] = {}
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        dims = entry.get("dims") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not isinstance(dims, dict) or name in profiles:
            raise InputError(f"--profiles {path}: profile {i} needs a unique name and a dims object")
        profiles[name] = parse_dim_overrides([f"{dim}={value}" for dim, value in dims.items()])
    return profiles


def profile_shapes(graph: GraphSpec, dims: dict[str, DimRange]) -> Profile:
    """min/opt/max shapes for every dynamic graph input, from the ranges of its named dims."""
    shapes: Profile = {}
    for spec in graph.inputs:
        if not spec.symbolic_dims():
            continue
        triple: list[list[int]] = [[], [], []]
        for dim in spec.shape:
            if isinstance(dim, str) and dim not in dims:
                raise InputError(f"input {spec.name!r} has dim {dim!r} with no range; pass --profile {dim}=MIN:OPT:MAX")
            values = (dims[dim].min, dims[dim].opt, dims[dim].max) if isinstance(dim, str) else (dim, dim, dim)
            for shape, n in zip(triple, values, strict=True):
                shape.append(n)
        shapes[spec.name] = ShapeRange(*triple)
    return shapes


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the worker's whole process group: SIGTERM, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class ProgressBar:
    """TensorRT's progress monitor as one self-rewriting line on a terminal; elsewhere (a log file, a
    pipe), where a redrawn line is a run of carriage returns, a log line as each phase starts and ends."""

    WIDTH = 24

    def __init__(self, enabled: bool, terminal: bool = True) -> None:
        self.enabled = enabled
        self.terminal = terminal
        self.shown = False

    def update(self, text: str) -> None:
        """`text`: the worker's progress line, "<steps done> <steps> <phase name>"."""
        done, total, name = text.split(" ", 2)
        if not self.enabled or not total.isdigit() or int(total) <= 0:
            return
        if not self.terminal:
            if int(done) == 0:
                logger.info("TensorRT: %s (%s) ...", name, plural(int(total), "step"))
            elif int(done) >= int(total):
                logger.info("TensorRT: %s: done", name)
            return
        filled = self.WIDTH * min(int(done), int(total)) // int(total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(f"\r[llm2trt] TensorRT [{bar}] {done}/{total} {name[:48]:<48}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False


# What the log says as the worker enters a phase (the TensorRT build's own phases follow the bar).
_ANNOUNCE = {"parse": "TensorRT: parsing {onnx} ...", "build": "TensorRT: building the engine from {onnx} ..."}


def _read_phases(proc: subprocess.Popen[str], tail: deque[str], bar: ProgressBar, onnx: str) -> str:
    """Follow the worker's stderr to its end; returns the last phase it announced."""
    phase = "plugins"
    for line in proc.stderr or ():
        if line.startswith(PROGRESS_MARK):
            bar.update(line[len(PROGRESS_MARK) :].rstrip("\n"))
            continue
        bar.close()
        if line.startswith(PHASE_MARK):
            phase = line[len(PHASE_MARK) :].strip()
            if phase in _ANNOUNCE:
                logger.info(_ANNOUNCE[phase].format(onnx=Path(onnx).name))
        elif line.startswith("[llm2trt] "):
            logger.info("%s", line[len("[llm2trt] ") :].rstrip())
        elif line.strip():
            tail.append(line.rstrip())
    return phase


class WorkerFailed(BackendError):
    """The worker failed in `phase`: it reported the failure (`reported`), crashed (`signal`
    names how) or exited without a result. `detail` is the backend's own last word; the message
    is the one line the user sees."""

    def __init__(
        self, message: str, phase: str, detail: str, *, signal: str | None = None, reported: bool = False
    ) -> None:
        super().__init__(message)
        self.phase, self.detail, self.signal, self.reported = phase, detail, signal, reported


def run_worker(request: BuildRequest, scratch: Path) -> BuildResult:
    """Run one request in the worker process; a crash or failure raises WorkerFailed."""
    request_path, result_path = scratch / "request.json", scratch / "result.json"
    request.write(request_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm2trt.build.worker", str(request_path), str(result_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,  # the CLI decides when it stops, not the terminal's Ctrl-C
    )
    tail: deque[str] = deque(maxlen=40)
    bar = ProgressBar(request.verbosity >= 0, terminal=sys.stderr.isatty())
    try:
        phase = _read_phases(proc, tail, bar, request.onnx)
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM, anything: the worker must not outlive us
        _stop(proc)
        raise
    finally:
        bar.close()
    if code < 0:
        name = signal.Signals(-code).name
        native = next((t for t in reversed(tail) if "Traceback" not in t), "")
        who = "TensorRT" if phase in ("parse", "build") else "the TensorRT worker"
        message = f"{who} crashed ({name}) while it {PHASES.get(phase, phase)} {request.onnx}"
        raise WorkerFailed(message + (f": {native}" if native else ""), phase, native, signal=name)
    try:
        result = BuildResult.read(result_path)
    except (OSError, RecordError):
        last = tail[-1] if tail else f"exit code {code}"
        raise WorkerFailed(f"TensorRT {phase} failed: {last}", phase, last) from None
    if not result.ok:
        verb = {"parse": "could not parse", "build": "could not build"}.get(
            result.stage, f"failed at {result.stage} of"
        )
        detail = result.error or ""
        raise WorkerFailed(f"TensorRT {verb} {request.onnx}: {detail}", result.stage, detail, reported=True)
    return result


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the worker starts."""

    backend: Backend
    compute_capability: str | None
    dims: dict[str, DimRange]
    profiles: dict[str, Profile]  # by name: "all", or "prefill" and "decode" for KV graphs
    static: dict[str, int]  # symbolic dims the engine fixes (a fixed-size cache buffer's length)


def kv_profile_dims(graph: GraphSpec, dims: dict[str, DimRange]) -> dict[str, dict[str, DimRange]]:
    """A prefill and a decode profile for a KV graph, neither with a zero-length dim (TensorRT
    rejects them): a growing cache's prefill takes one masked dummy slot as its past (the runtime
    feeds it), so past_sequence is 1 there, and total = past + sequence in both."""
    kv = graph.kv_cache
    if kv is None:
        return {"all": dims}
    seq, one = dims[SEQUENCE], DimRange(1, 1, 1)
    if kv.is_buffer:
        return {"prefill": dims, "decode": {**dims, SEQUENCE: one}}
    past = dims[PAST_SEQUENCE]
    prefill = {SEQUENCE: seq, PAST_SEQUENCE: one, TOTAL_SEQUENCE: DimRange(seq.min + 1, seq.opt + 1, seq.max + 1)}
    decode = {SEQUENCE: one, PAST_SEQUENCE: past, TOTAL_SEQUENCE: DimRange(past.min + 1, past.opt + 1, past.max + 1)}
    return {"prefill": {**dims, **prefill}, "decode": {**dims, **decode}}


def _plan(graph: GraphSpec, options: _Options) -> _Plan:
    backend = load_backend(options.backend)
    if options.timing_cache is not None:
        backend.require("timing_cache")
    if options.strip_weights:
        backend.require("strip_weights")
    resolved = resolve_compute_capability(backend, options.compute_capability)
    graph_dims = graph.symbolic_dims()
    named = load_profiles(options.profiles_file) if options.profiles_file else {"": {}}
    overrides = parse_dim_overrides(options.profile)
    unknown = set(overrides).union(*named.values()) - graph_dims
    if unknown:
        raise InputError(f"profiles name unknown dims {sorted(unknown)}; this model's dims are {sorted(graph_dims)}")
    if graph.kv_cache is not None and not graph.kv_cache.traits.tensorrt:
        raise InputError(
            "this graph's KV cache is ONNX Runtime's GroupQueryAttention (--kv-form gqa), which TensorRT cannot "
            "build: build the fixed or growing form of the same model"
        )
    profiles: dict[str, Profile] = {}
    static: dict[str, int] = {}
    dims: dict[str, DimRange] = {}
    for prefix, ranges in named.items():
        dims = {name: rng for name, rng in {**graph.dims, **ranges, **overrides}.items() if name in graph_dims}
        if graph.kv_cache is not None and graph.kv_cache.is_buffer:
            # TensorRT's KV_CACHE_UPDATE wants the buffer's length static ("The KV cache tensor must
            # have a static sequence length dimension"): the engine holds the range's max slots.
            slots = static.setdefault(CACHE_SEQUENCE, dims[CACHE_SEQUENCE].max)
            dims[CACHE_SEQUENCE] = DimRange(slots, slots, slots)
        for kind, kv_ranges in kv_profile_dims(graph, dims).items():
            name = ".".join(p for p in (prefix, "" if prefix and kind == "all" else kind) if p)
            profiles[name] = profile_shapes(graph, kv_ranges)
    return _Plan(backend, resolved, dims, profiles, static)


def specialize(onnx_path: Path, scratch: Path, static: dict[str, int]) -> Path:
    """A copy of the graph (weights not copied: its data files are linked) whose I/O has the given
    symbolic dims fixed, for TensorRT layers that need them static."""
    model = load_onnx(onnx_path, with_weights=False)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in static:
                dim.dim_value = static[dim.dim_param]
    return save_beside(model, onnx_path, scratch)


@dataclass(frozen=True)
class _Options:
    """What `build` was asked, the same for every rank."""

    compute_capability: str | None
    profile: tuple[str, ...] | list[str]
    timing_cache: Path | None
    strip_weights: bool
    backend: str
    verbosity: int
    opt_level: int | None = None  # TensorRT's builder optimization level (0-5; its default 3)
    profiles_file: Path | None = None  # named optimization profiles (load_profiles)


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
    opt_level: int | None = None,
    profiles_file: Path | None = None,
) -> Built | RanksBuilt | StagesBuilt:
    """Build the artifact's default graph into `out` (model.engine, build.json, manifest.json); a
    tensor-parallel artifact's ranks into rank{r}.engine, one per rank; a pipeline-parallel
    artifact's stages into stage{s}.engine, one per stage."""
    manifest = Manifest.read(artifact)
    if opt_level is not None and not 0 <= opt_level <= MAX_OPT_LEVEL:
        raise InputError(f"--opt-level {opt_level}: TensorRT's builder optimization levels are 0 to {MAX_OPT_LEVEL}")
    options = _Options(
        compute_capability, profile, timing_cache, strip_weights, backend, verbosity, opt_level, profiles_file
    )
    if manifest.tensor_parallel is not None and manifest.tensor_parallel.ranks:
        return _build_ranks(artifact, manifest, manifest.tensor_parallel, out, options, force)
    if manifest.tensor_parallel is not None:
        raise InputError(f"{artifact} is one rank of a tensor-parallel artifact: build the artifact above it")
    if manifest.pipeline_parallel is not None and manifest.pipeline_parallel.stages:
        return _build_stages(artifact, manifest, manifest.pipeline_parallel, out, options, force)
    if manifest.pipeline_parallel is not None:
        raise InputError(f"{artifact} is one stage of a pipeline-parallel artifact: build the artifact above it")
    with staged_output(out, force, reads=[artifact]) as stage:
        info, engine_manifest = _build_graph(artifact, manifest, out, stage, options, ENGINE_NAME)
        info.write(stage / BUILD_NAME)
        engine_manifest.write(stage)
    return Built(str(out), info)


@dataclass(frozen=True)
class RanksBuilt(Record):
    """What `build` wrote for a tensor-parallel artifact: one engine per rank."""

    output: str
    tp: int
    ranks: list[BuildInfo]

    def to_dict(self) -> dict[str, Any]:
        # build.json's SPEC keys from rank 0 (every rank is built alike), then each rank's own.
        return {
            "output": self.output,
            **self.ranks[0].to_dict(),
            "tp": self.tp,
            "ranks": [r.to_dict() for r in self.ranks],
        }

    def render(self) -> str:
        return "\n".join(info.describe(str(Path(self.output) / info.engine)) for info in self.ranks)


def _build_ranks(
    artifact: Path, manifest: Manifest, tp: TensorParallel, out: Path, options: _Options, force: bool
) -> RanksBuilt:
    from llm2trt.backends.onnxruntime.ranks import rank_dirs

    with staged_output(out, force, reads=[artifact]) as stage:
        infos = []
        for rank, folder in enumerate(rank_dirs(artifact, manifest)):
            info, _moved = _build_graph(folder, Manifest.read(folder), out, stage, options, f"rank{rank}.engine")
            infos.append(info)
        built = RanksBuilt(str(out), tp.tp, infos)
        (stage / BUILD_NAME).write_text(built.to_json())
        out_dir = Path(os.path.abspath(out))
        moved = manifest.moved(Path(os.path.abspath(artifact)), out_dir)
        ranks = [os.path.relpath(Path(os.path.abspath(artifact)) / r, out_dir) for r in tp.ranks]
        graph = replace(moved.graph(), engine=infos[0].engine)
        replace(moved.with_graph(graph), tensor_parallel=replace(tp, ranks=ranks)).write(stage)
    return built


@dataclass(frozen=True)
class StagesBuilt(Record):
    """What `build` wrote for a pipeline-parallel artifact: one engine per stage."""

    output: str
    pp: int
    stages: list[BuildInfo]

    def to_dict(self) -> dict[str, Any]:
        # build.json's SPEC keys from stage 0, then each stage's own (their I/O and layers differ).
        return {
            "output": self.output,
            **self.stages[0].to_dict(),
            "pp": self.pp,
            "stages": [s.to_dict() for s in self.stages],
        }

    def render(self) -> str:
        return "\n".join(info.describe(str(Path(self.output) / info.engine)) for info in self.stages)


def _build_stages(
    artifact: Path, manifest: Manifest, pp: PipelineParallel, out: Path, options: _Options, force: bool
) -> StagesBuilt:
    """One engine per stage (each with the prefill and decode profiles of its own I/O)."""
    from llm2trt.backends.onnxruntime.ranks import rank_dirs

    with staged_output(out, force, reads=[artifact]) as stage:
        infos = []
        for index, folder in enumerate(rank_dirs(artifact, manifest)):
            info, _moved = _build_graph(folder, Manifest.read(folder), out, stage, options, f"stage{index}.engine")
            infos.append(info)
        built = StagesBuilt(str(out), pp.pp, infos)
        (stage / BUILD_NAME).write_text(built.to_json())
        out_dir = Path(os.path.abspath(out))
        moved = manifest.moved(Path(os.path.abspath(artifact)), out_dir)
        stages = [os.path.relpath(Path(os.path.abspath(artifact)) / d, out_dir) for d in pp.stages]
        graph = replace(moved.graph(), engine=infos[0].engine)
        replace(moved.with_graph(graph), pipeline_parallel=replace(pp, stages=stages)).write(stage)
    return built


def _build_graph(
    artifact: Path, manifest: Manifest, out: Path, stage: Path, options: _Options, engine: str
) -> tuple[BuildInfo, Manifest]:
    """Build the default graph of one artifact into `stage/engine`; its build info and the manifest
    the engine directory would hold for it."""
    graph = manifest.graph()
    onnx_path = manifest.onnx_path(artifact, graph.name)
    with step(f"checking the weights of {artifact} against their recorded sha256"):
        manifest.verify_weights(artifact, graph.name)  # an engine bakes them in: a flipped byte stops here
    from llm2trt.passes.qdq import unfused_qdq
    from llm2trt.passes.zero_points import tensorrt_form, zero_point_weights

    # A clear error for a corrupt file before TensorRT sees it; Q/DQ TensorRT would not fuse, named.
    skeleton = load_onnx(onnx_path, with_weights=False)
    unfused = unfused_qdq(skeleton)
    for line in unfused[:5]:
        logger.warning("TensorRT cannot fuse %s: it stays a standalone scale layer", line)
    cache, strip = options.timing_cache, options.strip_weights
    plan = _plan(graph, options)
    scratch = stage / ".worker"
    scratch.mkdir()
    source = onnx_path.resolve()
    asymmetric = zero_point_weights(skeleton)
    if asymmetric:  # TensorRT refuses zero points: an equal form (passes/zero_points.py)
        with step(f"rewriting {plural(asymmetric, 'asymmetric INT4 weight')} for TensorRT"):
            source = tensorrt_form(skeleton, onnx_path.parent, scratch / "zero-points")
    source = specialize(source, scratch, plan.static) if plan.static else source
    request = BuildRequest(
        backend=plan.backend.name,
        onnx=str(source),
        engine=str(stage / engine),
        profiles=list(plan.profiles.values()),
        compute_capability=plan.compute_capability,
        strip_weights=strip,
        timing_cache=str(cache.resolve()) if cache else None,
        plugins=plugin_refs(),
        scratch=str(scratch),
        optimization_level=options.opt_level,
        verbosity=options.verbosity,
    )
    start = time.perf_counter()
    result = run_worker(request, scratch)
    shutil.rmtree(scratch)
    out_dir = Path(os.path.abspath(out))
    onnx_rel = os.path.relpath(onnx_path.resolve(), out_dir)
    seconds = round(time.perf_counter() - start, 3)
    info = _info(manifest, graph, plan, result, seconds, strip, onnx_rel, unfused)
    info = replace(info, engine=engine, optimization_level=options.opt_level)
    return info, _engine_manifest(manifest, artifact, out_dir, onnx_path, result, plan)


def _info(
    manifest: Manifest,
    graph: GraphSpec,
    plan: _Plan,
    result: BuildResult,
    total: float,
    strip: bool,
    onnx: str,
    unfused: list[str],
) -> BuildInfo:
    return BuildInfo(
        backend=plan.backend.name,
        backend_version=plan.backend.version,
        precision=manifest.dtype.value,
        strongly_typed=True,
        compute_capability=plan.compute_capability or "current-gpu",
        dims=plan.dims,
        optimization_profiles=list(plan.profiles.values()),
        profile_names=list(plan.profiles),
        static_dims=plan.static,
        plugins=result.plugins,
        timing_cache=result.timing_cache,
        strip_weights=strip,
        parse_seconds=result.parse_seconds,
        build_seconds=result.build_seconds,
        total_seconds=total,
        engine_bytes=result.engine_bytes,
        network_layers=result.layers,
        attention_ops=result.attention_ops,
        engine=ENGINE_NAME,
        onnx=onnx,
        fusions=graph.fusions,
        layer_types=result.layer_types,
        layer_precisions=result.layer_precisions,
        matmul_precisions=result.matmul_precisions,
        quantization=manifest.quantization.method if manifest.quantization else None,
        unfused_qdq=unfused,
    )


def _engine_manifest(
    manifest: Manifest, artifact: Path, out: Path, onnx_path: Path, result: BuildResult, plan: _Plan
) -> Manifest:
    """The artifact's manifest as seen from the engine directory: the build recorded, the graph's
    ONNX found by relative path (and its hash), the engine named."""
    record = PassRecord("tensorrt_build", True, {"network_layers": result.layers}, result.build_seconds, stage="build")
    moved = manifest.moved(Path(os.path.abspath(artifact)), out).with_passes([record])
    graph = moved.graph()
    dims = {**graph.dims, **{name: plan.dims[name] for name in plan.static}}
    return moved.with_graph(replace(graph, engine=ENGINE_NAME, onnx_sha256=sha256_files([onnx_path]), dims=dims))
