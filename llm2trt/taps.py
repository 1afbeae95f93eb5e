"""Taps: runners that stream an artifact's marked tensors, as they are produced, to a comparison.

A comparison takes each marked tensor from every tap, compares it and drops it, so memory holds
about one layer's activations per runner, not all of them, and each runner computes the graph
once:

- `torch`: the source model runs once in a worker thread; forward hooks on the marked tensors'
  modules hand each output over a queue of two, so the model waits for the comparison. When the
  comparison needs nothing more (bisect), the next hook stops the model.
- `ort`: the graph runs in segments, one per layer's marks (`segments.SegmentedGraph`); a
  segment runs when the comparison first asks for one of its tensors.
- `trt`: Polygraphy's TensorRT loaders build an engine with the marks as network outputs
  (`ModifyNetworkOutputs`) for the feeds' shapes and run it once; needs a GPU that runs engines.

Any other registered Polygraphy runner is a tap of the graph's outputs only.
"""

from __future__ import annotations

import abc
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.core.dtypes import to_numpy, to_torch
from llm2trt.core.errors import BackendError, InputError, first_line
from llm2trt.core.registry import Registry
from llm2trt.marks import Mark, rounds_of
from llm2trt.runners import RunnerContext, make_runner, torch_loader

if TYPE_CHECKING:
    import torch
    from polygraphy.backend.base import BaseRunner

# A tensor's values from one runner: one array, or (torch) every tensor its module returned,
# since a module's output may be a tuple whose order the graph does not keep.
Values = list[np.ndarray]
Stream = Iterator[tuple[str, Values]]


class Tap(abc.ABC):
    name: str
    segments = 1  # how many pieces its last run computed the graph in

    def provides(self, marks: Sequence[Mark]) -> set[str]:
        """The marks this tap has a counterpart for (the comparison asks it only for those)."""
        return {m.tensor for m in marks}

    @abc.abstractmethod
    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        """Run once on `feeds`; yield the marks it provides as they are produced."""

    def close(self) -> None:  # noqa: B027
        """Free what the tap holds."""


TapFactory = Callable[[RunnerContext], Tap]
TAPS: Registry[TapFactory] = Registry("tap")


def make_tap(name: str, ctx: RunnerContext) -> Tap:
    tap = TAPS.get(name)(ctx) if name in TAPS else RunnerTap(make_runner(name, ctx))
    tap.name = name
    return tap


def _tensors(value: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _host(tensor: torch.Tensor) -> np.ndarray:
    return np.array(to_numpy(tensor), copy=True)  # a later in-place op must not change it


class _Stop(Exception):
    """Raised in the model's thread once the comparison needs nothing more from it."""


class TorchTap(Tap):
    def __init__(self, ctx: RunnerContext) -> None:
        self._load = torch_loader(ctx)
        self._graph = ctx.graph
        self._module: torch.nn.Module | None = None

    def _wrapper(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self._load()
        return self._module

    def _hooked(self, marks: Sequence[Mark]) -> dict[str, str]:
        modules = dict(self._wrapper().model.named_modules())  # type: ignore[union-attr]
        return {m.module: m.tensor for m in marks if not m.graph_output and m.module and m.module in modules}

    def provides(self, marks: Sequence[Mark]) -> set[str]:
        return set(self._hooked(marks).values()) | {m.tensor for m in marks if m.graph_output}

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        args = [to_torch(t.dtype.cast(np.asarray(feeds[t.name]))) for t in self._graph.inputs]
        outputs = [m.tensor for m in marks if m.graph_output]
        run = _ModelRun(self._wrapper(), [t.name for t in self._graph.outputs], self._hooked(marks), outputs)
        worker = threading.Thread(target=run.work, args=(args,), name="torch-tap", daemon=True)
        worker.start()
        try:
            while True:
                item = run.channel.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise BackendError(f"PyTorch failed: {first_line(item)}") from None
                yield item
        finally:
            run.stop.set()
            worker.join()

    def close(self) -> None:
        self._module = None


class _ModelRun:
    """One forward of the model in a worker thread, handing hooked outputs over a short queue."""

    def __init__(self, wrapper: torch.nn.Module, names: list[str], hooked: dict[str, str], outputs: list[str]) -> None:
        self.wrapper, self.names, self.hooked, self.outputs = wrapper, names, hooked, outputs
        self.channel: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.remaining = set(hooked)

    def put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.channel.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        raise _Stop

    def hook(self, module_name: str) -> Callable[..., None]:
        def capture(module: torch.nn.Module, inputs: Any, out: Any) -> None:
            if module_name in self.remaining:  # a module called twice: its first call is the one traced
                self.remaining.discard(module_name)
                self.put((self.hooked[module_name], [_host(t) for t in _tensors(out)]))
            if not self.remaining and not self.outputs:
                raise _Stop

        return capture

    def work(self, args: list[torch.Tensor]) -> None:
        import torch

        modules = dict(self.wrapper.model.named_modules())  # type: ignore[union-attr]
        handles = [modules[name].register_forward_hook(self.hook(name)) for name in self.hooked]
        try:
            if self.hooked or self.outputs:
                with torch.no_grad():
                    named = dict(zip(self.names, self.wrapper(*args), strict=True))
                for name in self.outputs:
                    self.put((name, [_host(named[name])]))
            self.put(None)
        except _Stop:
            if not self.stop.is_set():  # stopped itself after the last hooked module: say so
                with contextlib.suppress(_Stop):
                    self.put(None)
        except Exception as exc:  # the model's own failure: handed to the comparison to report
            with contextlib.suppress(_Stop):
                self.put(exc)
        finally:
            for handle in handles:
                handle.remove()


class OrtTap(Tap):
    def __init__(self, ctx: RunnerContext, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnx

        from llm2trt.segments import SegmentedGraph

        path = ctx.onnx_path()
        self._graph = SegmentedGraph(onnx.load(str(path), load_external_data=False), path.parent, providers)
        self.segments = 0

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        inner = [m for m in marks if not m.graph_output]
        cuts = [(max(m.index for m in group), [m.tensor for m in group]) for group in rounds_of(inner)]
        for output in (m for m in marks if m.graph_output):
            at = next((i for i, (end, _) in enumerate(cuts) if end >= output.index), None)
            if at is None:
                cuts.append((output.index, [output.tensor]))
            else:
                cuts[at][1].append(output.tensor)
        self.segments = len(cuts)
        for name, value in self._graph.run(feeds, cuts):
            yield name, [value]


class TrtTap(Tap):
    """An engine with the marks as outputs, built for the feeds' shapes by Polygraphy's loaders."""

    def __init__(self, ctx: RunnerContext) -> None:
        from llm2trt.trt import load_backend

        self._backend = load_backend()
        reason = self._backend.cannot_run_engines()
        if reason:
            raise BackendError(f"cannot run marked {self._backend.display} engines here: {reason}")
        self._ctx = ctx

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        from polygraphy import config as polygraphy_config

        polygraphy_config.USE_TENSORRT_RTX = self._backend.is_rtx
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            ModifyNetworkOutputs,
            NetworkFromOnnxPath,
            Profile,
            TrtRunner,
        )

        profile = Profile()
        for name, value in feeds.items():
            profile.add(name, value.shape, value.shape, value.shape)
        outputs = [t.name for t in self._ctx.graph.outputs] + [m.tensor for m in marks if not m.graph_output]
        network = ModifyNetworkOutputs(NetworkFromOnnxPath(str(self._ctx.onnx_path())), outputs=outputs)
        # An engine hands back all its outputs at once: TensorRT holds every mark for one run.
        with TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))) as runner:
            out = runner.infer(feeds)
        for m in marks:
            if m.tensor in out:
                yield m.tensor, [np.asarray(out[m.tensor])]


class RunnerTap(Tap):
    """A Polygraphy runner as a tap of the graph's outputs (it cannot mark tensors)."""

    def __init__(self, runner: BaseRunner) -> None:
        self._runner = runner

    def provides(self, marks: Sequence[Mark]) -> set[str]:
        inner = [m.tensor for m in marks if not m.graph_output]
        if inner:
            raise InputError(f"runner {self.name!r} cannot mark intermediate tensors; use torch, ort or trt")
        return {m.tensor for m in marks}

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        with self._runner as runner:
            out = runner.infer(feeds)
        for m in marks:
            if m.tensor in out:
                yield m.tensor, [np.asarray(out[m.tensor])]


TAPS.register("torch", TorchTap)
TAPS.register("ort", OrtTap)
TAPS.register("trt", TrtTap)
