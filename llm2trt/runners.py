"""The runner registry: a name -> a factory that makes a Polygraphy runner for an artifact's graph.

Built in: `torch` (the transformers model the artifact came from, the reference), `ort` (ONNX
Runtime through Polygraphy's OnnxrtRunner) and `trt` (Polygraphy's TrtRunner over the built
engine). `register_runner` adds more (a test registers its own; so can a user's plugin module).

Polygraphy's own PytRunner moves inputs to CUDA and feeds them positionally; ours runs where
torch runs (the CPU here) and feeds transformers' keyword arguments.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from llm2trt.core.dtypes import to_numpy, to_torch
from llm2trt.core.manifest import GraphSpec, Manifest, TensorSpec
from llm2trt.core.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunnerContext:
    """What a runner factory is given: the artifact (or engine) directory, its manifest, the graph."""

    artifact: Path
    manifest: Manifest
    graph: GraphSpec

    def onnx_path(self) -> Path:
        return self.manifest.onnx_path(self.artifact, self.graph.name)


RunnerFactory = Callable[[RunnerContext], BaseRunner]
RUNNERS: Registry[RunnerFactory] = Registry("runner")


def register_runner(name: str, factory: RunnerFactory, *, replace: bool = False) -> RunnerFactory:
    return RUNNERS.register(name, factory, replace=replace)


def make_runner(name: str, ctx: RunnerContext) -> BaseRunner:
    runner = RUNNERS.get(name)(ctx)
    runner.name = name  # results are keyed by the name the user asked for
    return runner


def _metadata(specs: list[TensorSpec]) -> TensorMetadata:
    meta = TensorMetadata()
    for spec in specs:
        meta.add(spec.name, spec.dtype.host_numpy, [d if isinstance(d, int) else -1 for d in spec.shape])
    return meta


class TorchRunner(BaseRunner):  # type: ignore[misc]
    """Runs the transformers model the artifact was exported from, with the graph's interface
    (the exporter's own wrapper: cache tensors in and out for KV graphs)."""

    def __init__(self, load: Callable[[], torch.nn.Module], graph: GraphSpec, name: str = "torch") -> None:
        super().__init__(name=name, prefix="torch-runner")
        self._load = load
        self._graph = graph
        self.module: torch.nn.Module | None = None

    def activate_impl(self) -> None:
        self.module = self._load()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return _metadata(self._graph.inputs)

    def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict[str, np.ndarray]:
        import torch

        if self.module is None:
            raise RuntimeError("runner is not active")
        # Polygraphy hands over inputs in the metadata's host dtype (bfloat16 widened): back to the graph's.
        args = [to_torch(t.dtype.cast(np.asarray(feed_dict[t.name]))) for t in self._graph.inputs]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.module(*args)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((t.name, to_numpy(value)) for t, value in zip(self._graph.outputs, out, strict=True))

    def deactivate_impl(self) -> None:
        self.module = None


def torch_loader(ctx: RunnerContext, check_source: bool = True) -> Callable[[], torch.nn.Module]:
    """Loads the artifact's source model with the graph's interface (`export_module`); its
    `.model` is the transformers model, whose module names the graph's node scopes carry."""
    from llm2trt.export import export_module
    from llm2trt.models import source_from_info

    manifest = ctx.manifest
    source = source_from_info(manifest.source)
    if check_source and source.kind != "tiny":
        source.check_unchanged(manifest.source)

    def load() -> torch.nn.Module:
        model = source.load(manifest.dtype, manifest.attn_implementation)
        return export_module(model, ctx.graph, dict(source.spec.forward_kwargs))

    return load


def torch_runner(ctx: RunnerContext, check_source: bool = True) -> TorchRunner:
    return TorchRunner(torch_loader(ctx, check_source), ctx.graph)


def ort_runner(ctx: RunnerContext, providers: list[str] | None = None) -> BaseRunner:
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    onnxruntime.set_default_logger_severity(3)  # its notes (TensorScatter copying a buffer) are not ours
    return OnnxrtRunner(SessionFromOnnx(str(ctx.onnx_path()), providers=providers or ["cpu"]), name="ort")


def trt_runner(ctx: RunnerContext, backend_name: str = "auto") -> BaseRunner:
    """Polygraphy's TensorRT runner over the engine (needs a GPU that can run it)."""
    from llm2trt.trt import engine_to_run

    backend, engine = engine_to_run(ctx.artifact, ctx.graph.engine, "compare", backend_name)
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = backend.is_rtx
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="trt")


register_runner("torch", torch_runner)
register_runner("ort", ort_runner)
register_runner("trt", trt_runner)
