"""What every fuzz target shares: its settings, the contract each input is held to, and the guards
that turn a hang or a read outside the input into a failure (docs/fuzzing.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, settings

from llm2trt.core.errors import Llm2TrtError

T = TypeVar("T")

# Examples per target: small by default (CI); scripts/fuzz.py runs them longer. LLM2TRT_FUZZ_RANDOM=1:
# not derandomized (pytest --hypothesis-seed=N picks the inputs), what scripts/fuzz.py --seconds runs.
EXAMPLES = int(os.environ.get("LLM2TRT_FUZZ_EXAMPLES", "30"))
RANDOM = os.environ.get("LLM2TRT_FUZZ_RANDOM") == "1"
HANG_SECONDS = 20.0  # one input taking longer than this is a hang


def fuzz_settings(examples: int | None = None) -> settings:
    """Derandomized (CI reproduces every run), no deadline (the first example pays for imports),
    no example database (nothing written into the repository)."""
    return settings(
        max_examples=EXAMPLES if examples is None else examples,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain: slow, and says little here
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(BaseException):
    """An input ran past HANG_SECONDS (a BaseException: no `except Exception` under test swallows it)."""


class ReadOutside(BaseException):
    """The code under test opened a file it was not given."""


OUTCOMES: Counter[str] = Counter()  # examples / parsed / refused, for scripts/fuzz.py's table
_FENCE: list[tuple[str, str]] = []  # (watched root, allowed root): opens under the first, outside the second, fail


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _FENCE or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    watched, allowed = _FENCE[-1]
    if path.startswith(watched + os.sep) and not path.startswith(allowed + os.sep):
        _FENCE.clear()  # report once; the exception unwinds the call
        raise ReadOutside(f"opened {path}, outside {allowed}")


sys.addaudithook(_audit)


@contextlib.contextmanager
def fenced(watched: Path, allowed: Path) -> Iterator[None]:
    """Fail on any open() of a file under `watched` but outside `allowed` (Python-level opens: onnx's
    external-data reader, json, our own hashing)."""
    _FENCE.append((os.path.abspath(watched), os.path.abspath(allowed)))
    try:
        yield
    finally:
        _FENCE.clear()


@contextlib.contextmanager
def no_hang(seconds: float | None = None) -> Iterator[None]:
    seconds = HANG_SECONDS if seconds is None else seconds

    def fire(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def example() -> None:
    """Count one example (every call of a target, shrinking included)."""
    OUTCOMES["examples"] += 1


def clean(call: Callable[[], T]) -> T | None:
    """The contract: `call` returns (the input parsed), or raises an Llm2TrtError whose message is one
    non-empty line (what the CLI prints after `llm2trt: error:`). Any other exception, a hang or a read
    outside the input propagates: hypothesis reports it with the smallest input that does it."""
    try:
        with no_hang():
            value = call()
    except Llm2TrtError as exc:
        lines = str(exc).strip().splitlines()
        assert len(lines) == 1, f"{type(exc).__name__} of {len(lines)} lines: {str(exc)!r}"
        OUTCOMES["refused"] += 1
        return None
    OUTCOMES["parsed"] += 1
    return value
