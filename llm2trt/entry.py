"""The `llm2trt` console script: signal handlers first, then the CLI, whose imports (onnx, torch,
ONNX Runtime) take seconds. A Ctrl-C or SIGTERM during them is still one line and the signal's
exit code, never a traceback or a C extension's "ImportError: initialization failed"."""

from __future__ import annotations

import signal
import sys

from llm2trt.core.errors import Terminated
from llm2trt.core.signals import RECEIVED, on_sigint, on_sigterm, signal_message


def _stopped(signum: int) -> None:
    import json

    message = signal_message(signum)
    if "--json" in sys.argv[1:]:
        sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
    sys.stderr.write(f"llm2trt: error: {message}\n")
    sys.exit(128 + signum)


def _preload() -> None:
    """numpy first, here, where an interrupt is ours to report. Imported first by a C extension
    instead (its import_array), an interrupt mid-import is printed by the extension as a traceback.
    Help and version need no numpy."""
    args = sys.argv[1:]
    if args and not {"-h", "--help", "--version"} & set(args):
        import numpy  # noqa: F401


def main() -> None:
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _preload()
        from llm2trt.cli.main import main as cli_main
    except (KeyboardInterrupt, Terminated, Exception):
        if RECEIVED:
            _stopped(RECEIVED[-1])
        raise
    try:
        cli_main()
    except (KeyboardInterrupt, Terminated):  # before the command's own error path took over
        _stopped(RECEIVED[-1] if RECEIVED else signal.SIGINT)
