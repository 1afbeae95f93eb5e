"""The `llm2trt` command line: the group, its one error path, and the commands it holds.

The commands live by stage (llm2trt.cli.convert, .optimize, .build, .compare, .generate, .inspect);
their shared options are groups in llm2trt.cli.options. Imports of torch, onnx and TensorRT happen
inside the commands, so `--help` is fast and works where they are missing. Every failure is one line
on stderr and a non-zero exit, never a traceback (unless -vv asks for it).
"""

from __future__ import annotations

import errno
import json
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from llm2trt import __version__
from llm2trt.cli import build, compare, convert, generate, inspect, optimize, serve
from llm2trt.cli.options import COMMON, Context
from llm2trt.core.errors import Llm2TrtError, Terminated
from llm2trt.core.log import configure
from llm2trt.core.signals import RECEIVED, on_sigint, on_sigterm, signal_message

# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, writes fail).
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fail(ctx: Context, message: str, code: int) -> NoReturn:
    if ctx.as_json and not ctx.emitted:  # one JSON object on stdout, whatever happens
        click.echo(json.dumps({"ok": False, "error": message}))
    click.echo(f"llm2trt: error: {message}", err=True)
    sys.exit(code)


def _internal(ctx: Context, exc: Exception) -> NoReturn:
    """A bug of ours: still one line, the traceback on request."""
    if ctx.verbosity >= 2:
        traceback.print_exc()
    _fail(ctx, f"internal error: {type(exc).__name__}: {str(exc).strip()[:500]} (rerun with -vv for the traceback)", 3)


def _run(ctx: Context, body: Callable[[], Any]) -> Any:
    """Run a command's body: every way it can fail becomes one line and an exit code."""
    try:
        with _sigterm_raises():
            return body()
    except Llm2TrtError as exc:
        if ctx.verbosity >= 2:
            traceback.print_exc()
        _fail(ctx, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail(ctx, signal_message(signal.SIGINT), 128 + signal.SIGINT)
    except Terminated as exc:
        _fail(ctx, signal_message(exc.signum), 128 + exc.signum)
    except OSError as exc:
        if exc.errno in _OUT_OF_SPACE:  # staged_output already removed what was half-written
            where = f" writing {exc.filename}" if exc.filename else ""
            _fail(ctx, f"out of disk space{where}: {exc.strerror} (nothing was written)", 2)
        _internal(ctx, exc)
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if RECEIVED:  # a signal that a C extension turned into its own error (ImportError mid-import)
            _fail(ctx, signal_message(RECEIVED[-1]), 128 + RECEIVED[-1])
        _internal(ctx, exc)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so staged outputs and child processes are cleaned up."""

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # leave anyone else's handler alone
    previous_int = signal.signal(signal.SIGINT, on_sigint) if ours else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def _quiet_third_party(verbosity: int) -> None:
    import logging
    import os
    import warnings

    if verbosity < 1:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        # Progress bars (transformers' weight loading, the GGUF reader's plain tqdm) are read from the
        # environment when those libraries are imported, which the commands do after this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        warnings.filterwarnings("ignore")
        for name in ("transformers", "torch", "onnxscript", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


class CommandLineError(click.UsageError):
    """A mistake on the command line (a bad option value, a missing argument, an unknown command),
    shown like every other failure: one `llm2trt: error:` line (and the JSON object with --json),
    not click's usage block."""

    def __init__(self, exc: click.UsageError, as_json: bool) -> None:
        super().__init__(exc.format_message(), exc.ctx)
        self.as_json = as_json

    def show(self, file: Any = None) -> None:
        message = self.format_message()
        if self.ctx is not None:
            message += f" (see `{self.ctx.command_path} --help`)"
        if self.as_json:
            click.echo(json.dumps({"ok": False, "error": message}))
        click.echo(f"llm2trt: error: {message}", err=True)


@contextmanager
def _one_line_usage(args: list[str]) -> Iterator[None]:
    """Parsing: a usage mistake is one line, and so is a signal. Parsing may import what an option's
    choices or default come from (NumPy, for dtypes), where a C extension can turn Ctrl-C into its own
    ImportError."""
    as_json = "--json" in args  # read before parsing: click's parser pops from this list
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, CommandLineError):
        raise  # a bare `llm2trt debug` prints its help
    except click.UsageError as exc:
        raise CommandLineError(exc, as_json) from None
    except KeyboardInterrupt:
        _fail(Context(as_json, 0), signal_message(signal.SIGINT), 128 + signal.SIGINT)
    except Terminated as exc:
        _fail(Context(as_json, 0), signal_message(exc.signum), 128 + exc.signum)
    except Exception:
        if RECEIVED:
            _fail(Context(as_json, 0), signal_message(RECEIVED[-1]), 128 + RECEIVED[-1])
        raise


class _Command(click.Command):
    """Every command: usage mistakes as one line; --json, -v and -q parsed into the `Context` the
    command is handed (as `ctx`), logging set up from them, and the body run under `_run`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(args):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        common = COMMON.parse(ctx.params)
        configure(common.verbosity)
        _quiet_third_party(common.verbosity)
        ctx.params["ctx"] = common
        return _run(common, lambda: super(_Command, self).invoke(ctx))


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups (debug, eval) are _Groups too

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(args):
            return super().parse_args(ctx, args)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        with _one_line_usage(args):
            return super().resolve_command(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order added: the pipeline's


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm2trt")
def cli() -> None:
    """Hugging Face / PyTorch transformers to validated TensorRT engines through ONNX."""


# The commands in pipeline order, each with the line `llm2trt --help` lists it by.
cli.command(short_help="Export a model (HF directory, .gguf, tiny:<arch>) to ONNX.")(convert.convert)
cli.command(short_help="Run the pass pipeline (fusions, quantization, KV cache).")(optimize.optimize)
cli.command(short_help="Compile an artifact into a TensorRT engine.")(build.build)
cli.command(short_help="Check an artifact's outputs against PyTorch (and other runners).")(compare.compare)
_debug = cli.group(name="debug", short_help="Find the first layer whose outputs go wrong (bisect).")(compare.debug)
_debug.command()(compare.bisect)
_eval = cli.group(name="eval", short_help="Measure an artifact's quality: perplexity of a text (ppl).")(
    generate.eval_group
)
_eval.command()(generate.ppl)
cli.command(short_help="Generate text from a decoder artifact.")(generate.generate)
cli.command(short_help="Serve a decoder artifact over an OpenAI-compatible HTTP API.")(serve.serve)
cli.command(short_help="Show what an artifact holds.")(inspect.inspect)
cli.command(short_help="List the plugins this install provides.")(inspect.plugins)
cli.command(short_help="Fill a weight-stripped engine with an artifact's weights.")(inspect.refit)


def main() -> None:
    from llm2trt.core.memory import return_freed_buffers

    return_freed_buffers()
    cli(prog_name="llm2trt")
