"""The backends, registered once: a name -> `Backend`. Adding a backend is its package (a `BACKEND`
record) and one line in `_BUILTIN`; a test or a user's module may `register_backend` its own."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llm2trt.backends.base import Backend, DecoderContext, RunnerContext, RunnerFactory, RunnerTap, Tap
from llm2trt.core.errors import InputError
from llm2trt.core.registry import Registry

if TYPE_CHECKING:
    from polygraphy.backend.base import BaseRunner

    from llm2trt.backends.decoder import DecoderSession

_BUILTIN = ("llm2trt.backends.torch", "llm2trt.backends.onnxruntime", "llm2trt.backends.tensorrt")

BACKENDS: Registry[Backend] = Registry("runner")
for _module in _BUILTIN:
    _backend: Backend = importlib.import_module(_module).BACKEND
    BACKENDS.register(_backend.name, _backend)


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    return BACKENDS.register(backend.name, backend, replace=replace)


def register_runner(name: str, factory: RunnerFactory, *, replace: bool = False) -> Backend:
    """A backend that is only a Polygraphy runner (compare; tapped on its graph outputs)."""
    return register_backend(Backend(name, factory), replace=replace)


def make_runner(name: str, ctx: RunnerContext) -> BaseRunner:
    runner = BACKENDS.get(name).runner(ctx)
    runner.name = name  # results are keyed by the name the user asked for
    return runner


def make_tap(name: str, ctx: RunnerContext) -> Tap:
    backend = BACKENDS.get(name)
    tap = backend.tap(ctx) if backend.tap else RunnerTap(make_runner(name, ctx))
    tap.name = name
    return tap


def open_decoder(name: str, ctx: DecoderContext) -> DecoderSession:
    backend = BACKENDS.get(name)
    if backend.decoder is None:
        decoders = ", ".join(b.name for b in BACKENDS.entries() if b.decoder)
        raise InputError(f"runner {name!r} cannot decode token by token; use one of {decoders}")
    return backend.decoder(ctx)
