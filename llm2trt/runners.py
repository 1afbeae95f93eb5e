"""Polygraphy runners for llm2trt artifacts: PyTorch (the reference), ONNX Runtime, TensorRT.

Polygraphy's own PytRunner moves inputs to CUDA and feeds them positionally; ours runs where
torch runs (the CPU here) and feeds transformers' keyword arguments.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from llm2trt.errors import BackendError, InputError
from llm2trt.manifest import ENGINE_NAME, Manifest, TensorSpec

if TYPE_CHECKING:
    import torch

RUNNERS = ("torch", "ort", "trt")


def _metadata(specs: list[TensorSpec]) -> TensorMetadata:
    meta = TensorMetadata()
    for spec in specs:
        dtype = np.dtype("float32") if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
        meta.add(spec.name, dtype, [d if isinstance(d, int) else -1 for d in spec.shape])
    return meta


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


class TorchRunner(BaseRunner):  # type: ignore[misc]
    """Runs the transformers model the artifact was exported from."""

    def __init__(
        self,
        load: Callable[[], torch.nn.Module],
        inputs: list[TensorSpec],
        outputs: list[str],
        forward_kwargs: dict[str, Any],
        name: str = "torch",
    ) -> None:
        super().__init__(name=name, prefix="torch-runner")
        self._load = load
        self._inputs = inputs
        self._outputs = outputs
        self._forward_kwargs = forward_kwargs
        self.model: torch.nn.Module | None = None

    def activate_impl(self) -> None:
        self.model = self._load()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return _metadata(self._inputs)

    def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict[str, np.ndarray]:
        import torch

        from llm2trt.export import to_torch

        if self.model is None:
            raise RuntimeError("runner is not active")
        kwargs = {name: to_torch(np.asarray(value)) for name, value in feed_dict.items()}
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(**kwargs, **self._forward_kwargs, return_dict=True)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, _to_numpy(out[name])) for name in self._outputs)

    def deactivate_impl(self) -> None:
        self.model = None


def torch_runner(manifest: Manifest, check_source: bool = True) -> TorchRunner:
    from llm2trt.models import source_from_info

    source = source_from_info(manifest.source)
    if check_source and source.kind != "tiny":
        source.check_unchanged(manifest.source)

    def load() -> torch.nn.Module:
        return source.load(manifest.dtype, manifest.attn_implementation)

    return TorchRunner(load, manifest.inputs, [t.name for t in manifest.outputs], dict(source.spec.forward_kwargs))


def ort_runner(onnx_path: Path, providers: list[str] | None = None) -> BaseRunner:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers or ["cpu"]), name="ort")


def trt_runner(artifact: Path, backend_name: str = "auto") -> BaseRunner:
    """Polygraphy's TensorRT runner over the artifact's engine (needs a GPU that can run it)."""
    from llm2trt.trt import load_backend

    engine = artifact / ENGINE_NAME
    if not engine.is_file():
        raise InputError(
            f"no engine in {artifact}: build one with `llm2trt build {artifact} -o DIR` and compare that directory"
        )
    backend = load_backend(backend_name)
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = backend.is_rtx
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    if backend.is_rtx:
        from llm2trt.trt import gpu_visible

        if not gpu_visible():
            raise BackendError(
                "cannot run a TensorRT-RTX engine here: no GPU (engines build anywhere, "
                "but run only on a supported RTX/Ampere/Ada/Blackwell GPU)"
            )
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="trt")
