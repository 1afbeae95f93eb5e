"""PyTorch's tap: the source model runs once in a worker thread; forward hooks on the marked tensors'
modules hand each output over a queue of two, so the model waits for the comparison. When the
comparison needs nothing more (bisect), the next hook stops the model."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.backends.base import Mark, RunnerContext, Stream, Tap
from llm2trt.backends.torch.runner import torch_loader
from llm2trt.core.dtypes import to_numpy, to_torch
from llm2trt.core.errors import BackendError, first_line

if TYPE_CHECKING:
    import torch


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
