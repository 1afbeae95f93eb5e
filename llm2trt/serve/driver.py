"""serve: a decoder artifact behind an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C.

Stopping drains: the first signal stops new connections and new requests (503 on an open
connection), lets running requests finish until `drain_seconds`, cancels what is left (its clients
get an error event) and exits 0. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from llm2trt.core.errors import InputError
from llm2trt.serve.api import ServeOptions, Service, app
from llm2trt.serve.engine import Engine, Limits, Scheduler
from llm2trt.serve.metrics import Metrics
from llm2trt.serve.model import load

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    kv_cache_mb: int = 512
    block_size: int = 16
    limits: Limits = field(default_factory=Limits)
    options: ServeOptions = field(default_factory=ServeOptions)
    drain_seconds: float = 30.0
    name: str | None = None
    adapters: tuple[str, ...] = ()  # NAME=DIR: PEFT LoRA adapters for the artifact's slots


def build(artifact: Path, config: ServeConfig) -> Service:
    """The model loaded, its engine thread started, the API around it."""
    loaded = load(
        artifact,
        providers=list(config.providers),
        kv_bytes=config.kv_cache_mb << 20,
        block_size=config.block_size,
        name=config.name,
        adapters=config.adapters,
    )
    metrics = Metrics()
    engine = Engine(Scheduler(loaded, config.limits, metrics))
    return Service(engine, metrics, config.options)


def serve(artifact: Path, config: ServeConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until stopped; how many requests the drain cancelled."""
    import uvicorn

    service = build(artifact, config)
    listener = _listen(config.host, config.port)
    host, port = listener.getsockname()[:2]
    server = _drained_server(
        uvicorn.Config(
            app(service),
            http="h11",
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=max(1, round(config.drain_seconds)),
            h11_max_incomplete_event_size=64 << 10,  # request line and headers
        ),
        on_signal=service.engine.stop_accepting,
        on_started=(lambda: on_ready(f"http://{host}:{port}")) if on_ready else (lambda: None),
    )
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
    if not server.started:
        raise InputError(f"the server on {config.host}:{config.port} did not start")
    cancelled = service.engine.drain(time.perf_counter() + 1.0)
    logger.info("stopped; %d request(s) cancelled by the drain", cancelled)
    return cancelled


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that an address in use or not on this machine is one
    line naming it (uvicorn would log it and exit)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.create_server((host, port), family=family, backlog=2048)
        # Each token is a small write: without this, Nagle's algorithm holds them ~40 ms (accepted
        # sockets inherit the option on Linux; asyncio sets it only on sockets it creates itself).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return listener
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _drained_server(config: Any, on_signal: Callable[[], None], on_started: Callable[[], None]) -> Any:
    """uvicorn's server, telling `on_signal` when a stop signal comes (the engine stops admitting at
    once) and not re-raising it afterwards (a drained stop is a clean exit); `on_started` once it
    listens."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_signal()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_started()

    return Server(config)
