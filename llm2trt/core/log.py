"""Logging and progress for long steps.

The library logs through `logging`; the CLI routes the `llm2trt` logger to stderr so stdout stays
clean for `--json`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

logger = logging.getLogger("llm2trt")


def configure(verbosity: int) -> None:
    """Send llm2trt's log records to stderr: -1 quiet, 0 progress, 1+ debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("llm2trt")
    root.setLevel(level)
    if not any(getattr(h, "_llm2trt", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[llm2trt] %(message)s"))
        handler._llm2trt = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes: a handler holding the stream it was
    made with writes to a closed one once a test runner or redirect_stderr has swapped it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
            _last_line[0] = time.monotonic()
        except Exception:
            self.handleError(record)


_last_line = [0.0]  # when the handler last wrote (time.monotonic): `still_running` speaks only into silence


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`count` and the noun agreeing with it: "1 window", "2 windows", "0 windows"."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Log the start and the duration of a step that may take more than a moment."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)


T = TypeVar("T")


def progress(items: Sequence[T], what: str, every: float = 5.0) -> Iterator[T]:
    """Yield `items`, logging how far along `what` is at most every `every` seconds, and at the end."""
    start = last = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        now = time.perf_counter()
        if now - last >= every and i + 1 < len(items):
            logger.info("%s: %d/%d (%.0f s)", what, i + 1, len(items), now - start)
            last = now
    logger.info("%s: %d/%d done in %.1f s", what, len(items), len(items), time.perf_counter() - start)


@contextlib.contextmanager
def still_running(what: str, every: float) -> Iterator[None]:
    """Log that `what` is still going once nothing has been logged for `every` seconds, for work that
    reports nothing itself (a pass's search over layers): a silent minute looks like a hang."""
    done = threading.Event()
    start = said = time.monotonic()

    def quiet() -> float:
        return time.monotonic() - max(said, _last_line[0])

    def tick() -> None:
        nonlocal said
        while not done.wait(max(every - quiet(), 0.0)):
            if quiet() >= every:
                logger.info("%s: still running (%.0f s)", what, time.monotonic() - start)
                said = time.monotonic()

    thread = threading.Thread(target=tick, name="llm2trt-still-running", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
