"""The one TensorRT adapter: full `tensorrt` when importable, else TensorRT for RTX (`tensorrt_rtx`).

Both share TensorRT's Python API. What differs is written down here once, as capabilities:
TensorRT-RTX builds ahead of time for a named compute capability (no GPU needed) but cannot host
custom plugin layers, strip weights, refit, or use a timing cache (measured: docs/facts.md), and
runs engines only on the GPUs it supports.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.reports import PluginStatus
from llm2trt.plugins import PluginRef, PluginSpec
from llm2trt.plugins import resolve as resolve_plugin

BACKENDS = ("tensorrt", "tensorrt_rtx")
# Compute capabilities TensorRT-RTX builds for ahead of time.
RTX_COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
# What an ahead-of-time build targets when nothing else is said (tests, the demo): Ada, the
# newest generation with mature kernels for every fused op we emit.
DEFAULT_AOT_TARGET = "sm89"
# Features full TensorRT has and TensorRT-RTX refuses or breaks on.
FULL_TRT_ONLY = {
    "plugins": "custom plugin layers",
    "strip_weights": "weight-stripped engines (--strip-weights)",
    "refit": "refitting engines",
    "timing_cache": "timing caches (--timing-cache)",
}


@dataclass(frozen=True)
class Backend:
    name: str  # tensorrt | tensorrt_rtx
    version: str
    module: Any

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def display(self) -> str:
        return "TensorRT-RTX" if self.is_rtx else "TensorRT"

    def supports(self, feature: str) -> bool:
        if feature in FULL_TRT_ONLY:
            return not self.is_rtx
        if feature == "compute_capability":
            return self.is_rtx
        raise KeyError(feature)

    def require(self, feature: str) -> None:
        if not self.supports(feature):
            what = FULL_TRT_ONLY.get(feature, feature)
            raise BackendError(
                f"{what} need full TensorRT; this build uses TensorRT-RTX {self.version}, which cannot do that"
            )

    @property
    def aot_target(self) -> str | None:
        """The compute capability to build for when none is named and no GPU is here (None: the
        backend builds for the GPU it runs on)."""
        return DEFAULT_AOT_TARGET if self.is_rtx else None

    def cannot_run_engines(self) -> str | None:
        """Why engines cannot run on this machine, or None when they can."""
        if not gpu_visible():
            return "no GPU (engines build anywhere, but run only on a GPU)"
        if not self.is_rtx:
            return None
        cc = local_compute_capability()
        if cc is not None and cc not in RTX_COMPUTE_CAPABILITIES:
            return (
                f"this GPU is {cc}, which TensorRT-RTX {self.version} does not run "
                f"(it runs {', '.join(RTX_COMPUTE_CAPABILITIES)})"
            )
        return None

    def load_plugins(self, refs: list[PluginRef], used: Mapping[str, int] | None = None) -> list[PluginStatus]:
        """Import every registered plugin; register with TensorRT those the graph uses (`used`: nodes
        per op; None registers all) where TensorRT can host them.

        Under TensorRT-RTX a registered Python plugin aborts the process (docs/facts.md), so none
        is registered there: the op's local-function body is inlined instead.
        """
        statuses = []
        for ref in refs:
            spec = resolve_plugin(ref)
            nodes = used.get(spec.name, 0) if used is not None else 0
            status = PluginStatus(spec.name, spec.domain, spec.version, "unused", "not in this graph", nodes)
            if used is None or nodes:
                status = self._host(spec, status)
            statuses.append(status)
        return statuses

    def _host(self, spec: PluginSpec, status: PluginStatus) -> PluginStatus:
        if not self.supports("plugins"):
            why = f"TensorRT-RTX {self.version} cannot host plugin layers: the op's reference body is inlined"
            return replace(status, status="inlined", reason=why)
        spec.register_tensorrt(self.module)
        return replace(status, status="registered", reason="")

    def polygraphy_env(self) -> dict[str, str]:
        """What Polygraphy needs in the environment to drive this backend (read at its import)."""
        return {"POLYGRAPHY_USE_TENSORRT_RTX": "1" if self.is_rtx else "0"}


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):
        return None


def load_backend(name: str = "auto") -> Backend:
    """Import the TensorRT module: `auto` prefers full TensorRT, then TensorRT-RTX."""
    if name not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    for candidate in BACKENDS if name == "auto" else (name,):
        module = _import(candidate)
        if module is not None and hasattr(module, "Builder"):
            return Backend(candidate, str(getattr(module, "__version__", "unknown")), module)
    if name == "auto":
        raise BackendError("no TensorRT found: install TensorRT, or TensorRT for RTX with `pip install 'llm2trt[rtx]'`")
    raise BackendError(f"backend {name} is not importable here")


def engine_to_run(directory: Path, engine: str | None, use: str, backend_name: str = "auto") -> tuple[Backend, Path]:
    """The engine file of an engine directory and a backend that can run it here, its plugins
    loaded; `use` is the command to run on that directory once it is built (compare, generate)."""
    from llm2trt.plugins import refs

    path = directory / engine if engine else None
    if path is None or not path.is_file():
        raise InputError(f"no engine in {directory}: build one with `llm2trt build {directory} -o DIR` and {use} DIR")
    backend = load_backend(backend_name)
    reason = backend.cannot_run_engines()
    if reason:
        raise BackendError(f"cannot run a {backend.display} engine here: {reason}")
    backend.load_plugins(refs())
    return backend, path


def gpu_visible() -> bool:
    """A cheap check that a CUDA device exists (no CUDA context is created)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/dxg").exists()


def local_compute_capability() -> str | None:
    """The first GPU's compute capability as `smXY`, from nvidia-smi (None when it cannot tell)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return "sm" + out[0].replace(".", "") if out else None


def resolve_compute_capability(backend: Backend, requested: str | None) -> str | None:
    """The compute capability to build for, or None for "the GPU this runs on"."""
    if requested is None:
        if backend.is_rtx and not gpu_visible():
            raise InputError(
                "no GPU here to build for: pass --compute-capability (one of "
                f"{', '.join(RTX_COMPUTE_CAPABILITIES)}) to build ahead of time"
            )
        if not gpu_visible():
            raise InputError("no GPU here to build for: full TensorRT builds for the GPU it runs on")
        return None
    cc = requested.lower()
    if not backend.is_rtx:
        raise InputError("--compute-capability is a TensorRT-RTX option: full TensorRT builds for the GPU it runs on")
    if cc not in RTX_COMPUTE_CAPABILITIES:
        raise InputError(
            f"unsupported compute capability {requested!r}; TensorRT-RTX {backend.version} builds for "
            f"{', '.join(RTX_COMPUTE_CAPABILITIES)}"
        )
    return cc
