"""The backend seam: what every backend gives (a Polygraphy runner for compare, a tap for marked
intermediates, a decoder session for generate/eval/the checks, a rank executor) and the contexts and
records they are given. One `Backend` record per backend, registered once in `registry`."""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.lora import AdapterBatch
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.records import Record

if TYPE_CHECKING:
    from polygraphy.backend.base import BaseRunner

    from llm2trt.backends.decoder import DecoderSession


@dataclass(frozen=True)
class RunnerContext:
    """What a runner factory is given: the artifact (or engine) directory, its manifest, the graph."""

    artifact: Path
    manifest: Manifest
    graph: GraphSpec

    def onnx_path(self) -> Path:
        return self.manifest.onnx_path(self.artifact, self.graph.name)


@dataclass(frozen=True)
class DecoderContext:
    """What a decoder-session factory is given: the artifact, the decoder graph, the tokens it must hold."""

    artifact: Path
    manifest: Manifest
    graph: GraphSpec
    capacity: int  # prompt + new tokens the session must hold
    providers: list[str]
    adapters: AdapterBatch | None = None  # LoRA adapters per row (a graph with runtime slots)

    @property
    def pad_id(self) -> int:
        generation = self.manifest.generation
        return int(generation.pad_token_id) if generation and generation.pad_token_id is not None else 0


@dataclass(frozen=True)
class Mark(Record):
    """A tensor to compare: its ONNX name, the module it is the output of, where it comes."""

    tensor: str
    module: str | None
    layer: int | None
    index: int  # its producer's position in graph order (graph inputs: -1)
    graph_output: bool = False
    layer_output: bool = False  # the output of a whole layer (a block of the model's stack)


def rounds_of(marks: Sequence[Mark]) -> list[list[Mark]]:
    """Consecutive marks of one layer (or of the parts before, between and after layers)."""
    groups: list[list[Mark]] = []
    for mark in marks:
        if groups and groups[-1][-1].layer == mark.layer and not mark.graph_output:
            groups[-1].append(mark)
        else:
            groups.append([mark])
    return groups


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


RunnerFactory = Callable[[RunnerContext], "BaseRunner"]
TapFactory = Callable[[RunnerContext], Tap]
DecoderFactory = Callable[[DecoderContext], "DecoderSession"]
# Runs a task in one process per rank of a tensor-parallel artifact (artifact, task, providers).
RankRunner = Callable[[Path, Callable[..., Any], "list[str] | None"], Any]


def lazy(target: str) -> Callable[..., Any]:
    """A factory named "package.module:function", imported on first call: registering a backend loads
    none of its runtime (torch, onnxruntime, TensorRT), so `llm2trt --help` stays fast."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


@dataclass(frozen=True)
class Backend:
    """One runtime backend. `runner` is required; a backend without a tap is tapped through its
    runner (graph outputs only), one without a decoder or rank runner refuses those uses by name."""

    name: str
    runner: RunnerFactory
    tap: TapFactory | None = None
    decoder: DecoderFactory | None = None
    ranks: RankRunner | None = None
    description: str = ""
