"""Parse and build in a child process, through Polygraphy's TensorRT loaders.

TensorRT can abort or segfault on some graphs (docs/facts.md), and a crash there must become a
clear error, not a dead CLI. The parent (`llm2trt.build.driver.run_worker`) and this child share one
protocol: a `BuildRequest` in, a `BuildResult` out (both typed records), and phase lines on
stderr so a crash is attributed to the step it hit.

Run as `python -m llm2trt.build.worker REQUEST.json RESULT.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm2trt.backends.tensorrt.adapter import Backend, load_backend
from llm2trt.core.errors import Llm2TrtError
from llm2trt.core.log import configure, plural
from llm2trt.core.records import Record
from llm2trt.core.reports import PluginStatus, Profile, TimingCacheInfo
from llm2trt.plugins import PluginRef

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger("llm2trt.backends.tensorrt.adapter")
PHASE_MARK = "[llm2trt-phase] "
PROGRESS_MARK = "[llm2trt-progress] "  # "<done> <steps> <phase>": the parent draws a bar
PHASES = {"plugins": "loaded plugins for", "parse": "parsed", "build": "built"}


@dataclass(frozen=True)
class BuildRequest(Record):
    """What the parent asks the worker to do."""

    backend: str
    onnx: str
    engine: str | None  # where to write the plan; None parses (and counts layers) only
    profiles: list[Profile] = field(default_factory=list)
    compute_capability: str | None = None
    strip_weights: bool = False
    timing_cache: str | None = None
    plugins: list[PluginRef] = field(default_factory=list)
    optimization_level: int | None = None  # TensorRT's builder optimization level
    scratch: str | None = None  # where the worker may write a variant of the graph (plugin bodies inlined)
    # Let TensorRT decompose attention it has no fused kernel for (what `llm2trt build` does).
    decomposable_attention: bool = True
    verbosity: int = 0


@dataclass(frozen=True)
class BuildResult(Record):
    """What the worker did; on failure `stage` names the phase that failed."""

    ok: bool
    stage: str  # plugins | parse | build | done
    error: str | None = None
    layers: int = 0
    layer_types: dict[str, int] = field(default_factory=dict)
    # Layers by output type, and matrix multiplies by their operands' types (a DequantizeLinear
    # operand counts as its quantized type): how much of the network runs in each precision.
    layer_precisions: dict[str, int] = field(default_factory=dict)
    matmul_precisions: dict[str, int] = field(default_factory=dict)
    attention_ops: int = 0
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    engine_bytes: int = 0
    timing_cache: TimingCacheInfo | None = None
    plugins: list[PluginStatus] = field(default_factory=list)


class StageFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _phase(name: str) -> None:
    """A protocol line for the parent, whatever the verbosity: it names the phase a crash hits."""
    sys.stderr.write(f"{PHASE_MARK}{name}\n")
    sys.stderr.flush()


class _Errors(logging.Handler):
    """Collects what Polygraphy and TensorRT report as errors (TensorRT's ERROR goes through
    Polygraphy's logger), so a failure names its cause rather than "Invalid Engine"."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        for prefix in ("[E] ", "[!] "):
            text = text.removeprefix(prefix)
        self.messages.append(text)

    def last(self, default: str) -> str:
        useful = [m for m in self.messages if "Invalid Engine" not in m and "Could not parse" not in m]
        return (useful or self.messages or [default])[-1]


@contextlib.contextmanager
def _polygraphy_logging(verbosity: int) -> Iterator[_Errors]:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.use_python_logging_system = True
    G_LOGGER.module_severity = G_LOGGER.INFO if verbosity > 1 else G_LOGGER.ERROR
    errors = _Errors()
    poly = logging.getLogger("Polygraphy")
    poly.addHandler(errors)
    poly.propagate = verbosity > 1
    try:
        yield errors
    finally:
        poly.removeHandler(errors)


def _make_progress(trt: Any) -> Any:
    """TensorRT's progress monitor: top-level phases go to the parent as progress lines (its bar),
    long phases to the log."""

    class Progress(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}
            self._steps: dict[str, int] = {}
            self._top: str | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._start[phase_name] = time.perf_counter()
            if parent_phase is None:
                self._top, self._steps[phase_name] = phase_name, num_steps
                _progress(0, num_steps, phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name == self._top:
                _progress(step + 1, self._steps[phase_name], phase_name)
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            if phase_name == self._top:  # TensorRT may skip steps: the bar ends full, the log says done
                _progress(self._steps[phase_name], self._steps[phase_name], phase_name)
            took = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            if took > 2.0:
                logger.debug("TensorRT: %s done in %.1f s", phase_name, took)

    return Progress()


def _progress(done: int, steps: int, phase: str) -> None:
    sys.stderr.write(f"{PROGRESS_MARK}{done} {steps} {phase}\n")
    sys.stderr.flush()


def allow_attention_decomposition(trt: Any, network: Any) -> None:
    """Let TensorRT decompose attention it has no fused kernel for (fp32, some shapes).

    Without this, an ONNX Attention node that no dedicated kernel covers fails the whole build
    ("Attention operation was not supported by a dedicated kernel"); with it, TensorRT still uses a
    fused kernel where one exists.
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


def mark_attention_decomposable(network: Any) -> None:
    """The same step as a Polygraphy network post-processing hook, for users building an llm2trt
    graph with Polygraphy themselves (README: "Building with Polygraphy or trtexec"):

        polygraphy convert model.onnx --convert-to trt -o model.engine \\
            --trt-network-postprocess-script "$(python -m llm2trt.build.worker --hook)"
    """
    from polygraphy.mod.trt_importer import lazy_import_trt

    allow_attention_decomposition(lazy_import_trt(), network)


def _parse(request: BuildRequest, backend: Backend, errors: _Errors) -> tuple[Any, dict[str, int]]:
    """The parsed network and its layer counts by type (an attention is one ATTENTION_OUTPUT)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath, PostprocessNetwork
    from polygraphy.exception import PolygraphyException

    # TensorRT-RTX networks are always strongly typed; full TensorRT is asked to be.
    loader = NetworkFromOnnxPath(request.onnx, strongly_typed=not backend.is_rtx)
    if request.decomposable_attention:
        loader = PostprocessNetwork(loader, functools.partial(allow_attention_decomposition, backend.module))
    try:
        built = loader()
    except PolygraphyException:
        raise StageFailed("parse", errors.last("unknown parse error")) from None
    network = built[1]
    types = Counter(str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers))
    return built, dict(types)


def _type_name(dtype: Any) -> str:
    from llm2trt.core.dtypes import DType

    found = DType.find(dtype)
    return found.value if found is not None else str(dtype).rsplit(".", 1)[-1].lower()


def _kind(layer: Any) -> str:
    return str(layer.type).rsplit(".", 1)[-1]


def precisions(network: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Layers by output type; matrix multiplies by operand types ('int8 x int8', 'fp32 x int4')."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producers = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    by_output: Counter[str] = Counter()
    matmuls: Counter[str] = Counter()
    for layer in layers:
        by_output[_type_name(layer.get_output(0).dtype)] += 1
        if _kind(layer) != "MATRIX_MULTIPLY":
            continue
        operands = []
        for k in range(layer.num_inputs):
            tensor = layer.get_input(k)
            producer = producers.get(tensor.name)
            while producer is not None and _kind(producer) == "SHUFFLE":  # the parser's broadcast reshapes
                producer = producers.get(producer.get_input(0).name)
            if producer is not None and _kind(producer) == "DEQUANTIZE":
                tensor = producer.get_input(0)  # the quantized operand
            operands.append(_type_name(tensor.dtype))
        matmuls[" x ".join(operands)] += 1
    return dict(by_output), dict(matmuls)


def _config(request: BuildRequest, backend: Backend) -> Any:
    from polygraphy.backend.trt import CreateConfig, Profile

    profiles = []
    for shapes in request.profiles:
        profile = Profile()
        for name, rng in shapes.items():
            profile.add(name, rng.min, rng.opt, rng.max)
        profiles.append(profile)
    kwargs: dict[str, Any] = {"profiles": profiles, "progress_monitor": _make_progress(backend.module)}
    if request.optimization_level is not None:
        kwargs["builder_optimization_level"] = request.optimization_level
    if request.timing_cache:  # full TensorRT only; the parent refuses it under TensorRT-RTX
        kwargs["load_timing_cache"] = request.timing_cache
    if request.strip_weights:  # full TensorRT only
        kwargs.update(strip_plan=True, refittable=True)
    if backend.is_rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        cc = request.compute_capability
        targets = [(int(cc[2:-1]), int(cc[-1]))] if cc else None
        return CreateConfigRTX(compute_capabilities=targets, use_gpu=cc is None, **kwargs)
    return CreateConfig(**kwargs)


def _build(request: BuildRequest, backend: Backend, network: Any, errors: _Errors) -> tuple[int, float, Any]:
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    before = (
        Path(request.timing_cache).stat().st_size if request.timing_cache and Path(request.timing_cache).exists() else 0
    )
    start = time.perf_counter()
    try:
        plan = EngineBytesFromNetwork(network, _config(request, backend), save_timing_cache=request.timing_cache)()
    except PolygraphyException:
        raise StageFailed("build", errors.last("TensorRT returned no engine")) from None
    seconds = time.perf_counter() - start
    data = memoryview(plan)
    if request.engine:
        Path(request.engine).write_bytes(data)
    cache = None
    if request.timing_cache:
        after = Path(request.timing_cache).stat().st_size
        # A cache that was non-empty before and did not grow served every tactic: a hit.
        cache = TimingCacheInfo(request.timing_cache, before, after, before > 0 and after == before)
    return len(data), seconds, cache


def plugin_nodes(model: onnx.ModelProto) -> Counter[str]:
    """Nodes per op type outside the standard domains."""
    return Counter(n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx"))


def inline_unhosted(request: BuildRequest, plugins: list[PluginStatus], model: onnx.ModelProto) -> BuildRequest:
    """The graph with the local function of every used, unregistered plugin op inlined. ONNX's
    inliner gives each call its own names: TensorRT's parser inlines a function called more than
    once under the same layer names and fails (measured, TensorRT-RTX 1.7)."""
    import onnx.inliner

    from llm2trt.core.artifact import save_beside

    inline = [(p.domain, p.name) for p in plugins if p.status == "inlined" and p.nodes]
    if not inline:
        return request
    if request.scratch is None:
        raise StageFailed("plugins", "no scratch directory to write the graph with plugin bodies inlined")
    inlined: onnx.ModelProto = onnx.inliner.inline_selected_functions(model, inline, exclude=False)
    for p in plugins:
        if (p.domain, p.name) in inline:
            runs = "runs" if p.nodes == 1 else "run"
            logger.info(
                "plugin %s::%s: %s %s its reference body (inlined)", p.domain, p.name, plural(p.nodes, "node"), runs
            )
    path = save_beside(inlined, Path(request.onnx), Path(request.scratch) / "inlined")
    return replace(request, onnx=str(path))


def work(request: BuildRequest) -> BuildResult:
    from llm2trt.core.artifact import load_onnx

    backend = load_backend(request.backend)
    _phase("plugins")
    graph = load_onnx(Path(request.onnx), with_weights=False, confine=False)  # the parent checked it
    try:
        plugins = backend.load_plugins(request.plugins, plugin_nodes(graph))
    except Llm2TrtError as exc:
        raise StageFailed("plugins", str(exc)) from None
    request = inline_unhosted(request, plugins, graph)
    _phase("parse")
    with _polygraphy_logging(request.verbosity) as errors:
        start = time.perf_counter()
        network, types = _parse(request, backend, errors)
        parse_seconds = round(time.perf_counter() - start, 3)
        layers = network[1].num_layers
        logger.info("TensorRT parsed %s in %.1f s", plural(layers, "layer"), parse_seconds)
        by_output, matmuls = precisions(network[1])
        parsed = BuildResult(
            ok=True,
            stage="parse",
            layers=layers,
            layer_types=types,
            layer_precisions=by_output,
            matmul_precisions=matmuls,
            attention_ops=types.get("ATTENTION_OUTPUT", 0),
            parse_seconds=parse_seconds,
            plugins=plugins,
        )
        if request.engine is None:
            return parsed
        _phase("build")
        nbytes, seconds, cache = _build(request, backend, network, errors)
    return replace(parsed, stage="done", build_seconds=round(seconds, 3), engine_bytes=nbytes, timing_cache=cache)


def _die_with_parent() -> None:
    """Ask Linux to kill this process if the parent dies first (a SIGKILLed CLI leaves no build behind)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)


def main(argv: list[str]) -> int:
    from llm2trt.core.memory import return_freed_buffers

    return_freed_buffers()
    if argv == ["--hook"]:  # where Polygraphy finds mark_attention_decomposable
        sys.stdout.write(f"{__file__}:{mark_attention_decomposable.__name__}\n")
        return 0
    _die_with_parent()
    request = BuildRequest.read(Path(argv[0]))
    # Polygraphy reads this at import: it must be set before the first polygraphy import.
    os.environ.update(load_backend(request.backend).polygraphy_env())
    configure(request.verbosity)
    try:
        result = work(request)
    except StageFailed as exc:
        result = BuildResult(False, exc.stage, str(exc))
    result.write(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
