"""The `llm2trt` console script: signal handlers first, then the CLI, whose imports (onnx, torch,
ONNX Runtime) take seconds. A Ctrl-C or SIGTERM during them is still one line and the signal's
exit code, never a traceback or a C extension's "ImportError: initialization failed"."""

from __future__ import annotations

import signal
import sys
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


def _stopped(signum: int) -> None:
    import json

    message = signal_message(signum)
    if "--json" in sys.argv[1:]:
        sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
    sys.stderr.write(f"llm2trt: error: {message}\n")
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from llm2trt.cli import main as cli_main
    except (KeyboardInterrupt, Terminated, Exception):
        if RECEIVED:
            _stopped(RECEIVED[-1])
        raise
    cli_main()
