"""PyTorch's runner: the transformers model the artifact was exported from, the reference.

Polygraphy's own PytRunner moves inputs to CUDA and feeds them positionally; this one runs where
torch runs and feeds the graph's inputs to the exporter's wrapper, which has the graph's interface.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from llm2trt.backends.base import RunnerContext
from llm2trt.core.dtypes import to_numpy, to_torch
from llm2trt.core.manifest import GraphSpec, TensorSpec

if TYPE_CHECKING:
    import torch


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
    from llm2trt.convert.export import export_module
    from llm2trt.convert.sources import source_from_info

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
