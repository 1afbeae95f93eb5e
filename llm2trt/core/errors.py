"""Exceptions that reach the user as one clear line.

Everything a user can cause (a bad path, an unsupported architecture, a graph TensorRT rejects)
raises an `Llm2TrtError`; the CLI prints its message and exits non-zero without a traceback.
"""


class Llm2TrtError(Exception):
    """An error the user can act on; its message names the cause."""

    exit_code = 2


class InputError(Llm2TrtError):
    """Bad input: a missing path, an unsupported model, a corrupt file."""


class BackendError(Llm2TrtError):
    """A backend (PyTorch, ONNX Runtime, TensorRT) failed or is unavailable."""


class CheckFailed(Llm2TrtError):
    """A check ran and did not pass: a comparison beyond tolerance, a missing fusion."""

    exit_code = 1


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM): raised like Ctrl-C so cleanup runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line error
    quotes of a backend's multi-line report."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
