"""Signals as errors: Ctrl-C and SIGTERM become exceptions the CLI reports in one line, and the list of
signals received lets code that saw another error (a C extension's import failing mid-signal) know why."""

from __future__ import annotations

import signal
from types import FrameType

from llm2trt.core.errors import Terminated

RECEIVED: list[int] = []  # the signals this process got, however the code they interrupted reported them


def signal_message(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    RECEIVED.append(signum)
    raise Terminated(signum)


def on_sigint(signum: int, frame: FrameType | None) -> None:
    RECEIVED.append(signum)
    raise KeyboardInterrupt
