"""The plugin registry: ops in the `llm2trt` ONNX domain that a TensorRT plugin can implement.

Every plugin has three faces: an ONNX op whose local-function body is the reference (ONNX Runtime
runs it; TensorRT inlines it when no plugin of that name is registered), a TensorRT plugin of
the same name for full TensorRT, and its kernel. A plugin lives in an importable module that
registers a `PluginSpec` here at import: llm2trt's own under this package, others announced by
an installed distribution's `llm2trt.plugins` entry point (name = the op, value = the module).
The build worker (a separate process) and the TensorRT runner import those modules and load what
the backend can host. llm2trt ships none yet.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from llm2trt.core.errors import BackendError
from llm2trt.core.records import Record
from llm2trt.core.registry import Registry

DOMAIN = "llm2trt"


@dataclass(frozen=True)
class PluginSpec:
    name: str  # the ONNX op type in the llm2trt domain, and the TensorRT plugin's name
    version: int  # the op's version in the llm2trt domain (bumped with any ABI change)
    module: str  # the importable module that registers this spec (the worker imports it)
    # Registers the TensorRT plugin creator with the imported TensorRT module (full TensorRT).
    register_tensorrt: Callable[[Any], None]
    kernel_available: Callable[[], bool] = lambda: False
    domain: str = DOMAIN


@dataclass(frozen=True)
class PluginRef(Record):
    """A registered plugin as another process finds it: by name, in the module that registers it."""

    name: str
    module: str


PLUGINS: Registry[PluginSpec] = Registry("plugin")


def register_plugin(spec: PluginSpec) -> PluginSpec:
    return PLUGINS.register(spec.name, spec)


ENTRY_POINT_GROUP = "llm2trt.plugins"


def refs() -> list[PluginRef]:
    """Every plugin this install knows, registered or announced (not imported: importing is the
    worker's job, in a process that may crash)."""
    found = {spec.name: PluginRef(spec.name, spec.module) for spec in PLUGINS.entries()}
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
