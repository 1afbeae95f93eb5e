"""Logging and progress for long steps.

The library logs through `logging`; the CLI routes the `llm2trt` logger to stderr so stdout stays
clean for `--json`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
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
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[llm2trt] %(message)s"))
        handler._llm2trt = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


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
