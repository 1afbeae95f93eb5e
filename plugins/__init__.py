"""The plugin registry: ops in the `llm2trt` ONNX domain that a TensorRT plugin can implement.

Every plugin has three faces: an ONNX op whose local-function body is the reference (ONNX Runtime
runs it; TensorRT inlines it when no plugin of that name is registered), a TensorRT plugin of
the same name for full TensorRT, and its kernel. A plugin lives in an importable module that
registers a `PluginSpec` here at import: llm2trt's own under this package, others announced by
an installed distribution's `llm2trt.plugins` entry point (name = the op, value = the module).
The build worker (a separate process) and the TensorRT runner import those modules and load what
the backend can host. llm2trt ships `Int4GroupGemm` (`llm2trt.plugins.int4_gemm`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.records import Record
from llm2trt.core.registry import Registry

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from llm2trt.passes.pattern import RewriteRule

DOMAIN = "llm2trt"


@dataclass(frozen=True)
class PluginSpec:
    name: str  # the ONNX op type in the llm2trt domain, and the TensorRT plugin's name
    version: int  # the op's version in the llm2trt domain (bumped with any ABI change)
    module: str  # the importable module that registers this spec (the worker imports it)
    # Registers the TensorRT plugin creator with the imported TensorRT module (full TensorRT).
    register_tensorrt: Callable[[Any], None]
    kernel_available: Callable[[], bool] = lambda: False
    summary: str = ""
    matches: str = ""  # what `optimize --plugin` rewrites, said when nothing in a graph matches
    # `optimize --plugin NAME`: the rules that rewrite a pattern into the op, and the op's local
    # function (its reference body) for a given opset. None: the plugin has no rewrite.
    rules: Callable[[], list[RewriteRule]] | None = None
    function: Callable[[int], gs.Function] | None = None
    domain: str = DOMAIN

    @property
    def tensorrt_name(self) -> str:
        """The TensorRT plugin's id: the ONNX parser finds it by the node's domain and op type."""
        return f"{self.domain}::{self.name}"


@dataclass(frozen=True)
class PluginRef(Record):
    """A registered plugin as another process finds it: by name, in the module that registers it."""

    name: str
    module: str


PLUGINS: Registry[PluginSpec] = Registry("plugin")


def register_plugin(spec: PluginSpec) -> PluginSpec:
    return PLUGINS.register(spec.name, spec)


ENTRY_POINT_GROUP = "llm2trt.plugins"
# llm2trt's own plugins, by op name: module.
BUILTIN = {"Int4GroupGemm": "llm2trt.plugins.int4_gemm", "MoE": "llm2trt.plugins.moe_trt"}


def refs() -> list[PluginRef]:
    """Every plugin this install knows, registered or announced (not imported: importing is the
    worker's job, in a process that may crash)."""
    found = {name: PluginRef(name, module) for name, module in BUILTIN.items()}
    found.update({spec.name: PluginRef(spec.name, spec.module) for spec in PLUGINS.entries()})
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, PluginRef(entry.name, entry.value))
    return list(found.values())


def resolve(ref: PluginRef) -> PluginSpec:
    """Import the module that registers `ref` (in this process) and return its spec."""
    if ref.name not in PLUGINS:
        try:
            importlib.import_module(ref.module)
        except ImportError as exc:
            raise BackendError(f"plugin {ref.name!r}: cannot import {ref.module}: {exc}") from None
    if ref.name not in PLUGINS:
        raise BackendError(f"plugin {ref.name!r}: importing {ref.module} did not register it")
    return PLUGINS.get(ref.name)


def find(name: str) -> PluginSpec:
    """The plugin `name` (imported), or an error naming the plugins this install has."""
    known = {ref.name: ref for ref in refs()}
    if name not in known:
        raise InputError(f"unknown plugin {name!r}; this install has: {', '.join(sorted(known)) or 'none'}")
    return resolve(known[name])


@dataclass(frozen=True)
class PluginInfo(Record):
    """One line of `llm2trt plugins`."""

    name: str
    domain: str
    version: int
    tensorrt_plugin: str  # the TensorRT plugin's id (namespace::name), version "1"
    kernel_available: bool  # its kernel can run here (Triton and a CUDA GPU)
    summary: str
    module: str


@dataclass(frozen=True)
class PluginList(Record):
    plugins: list[PluginInfo]
    backend: str  # what a build here does with them

    def render(self) -> str:
        if not self.plugins:
            return "no plugins"
        lines = [f"{'ONNX op':<27} {'TensorRT plugin':<27} {'kernel here':<11} what"]
        for p in self.plugins:
            op, plugin, kernel = f"{p.domain}::{p.name} v{p.version}", f"{p.tensorrt_plugin} v1", p.kernel_available
            lines.append(f"{op:<27} {plugin:<27} {'yes' if kernel else 'no':<11} {p.summary}")
        return "\n".join([*lines, self.backend])


def listing(backend_note: str) -> PluginList:
    """Every plugin this install has, imported (this runs their registration code)."""
    infos = []
    for ref in refs():
        spec = resolve(ref)
        infos.append(
            PluginInfo(
                spec.name,
                spec.domain,
                spec.version,
                spec.tensorrt_name,
                spec.kernel_available(),
                spec.summary,
                spec.module,
            )
        )
    return PluginList(infos, backend_note)
