"""The `llm2trt` command line.

Imports of torch, onnx and TensorRT happen inside the commands, so `--help` is fast and works
where they are missing. Every command shares one option group (--json, -v, -q) and one error
path: a clear line on stderr and a non-zero exit, never a traceback (unless -vv asks for it).
"""

from __future__ import annotations

import errno
import functools
import json
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from llm2trt import __version__
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError, Llm2TrtError, Terminated
from llm2trt.core.kv import KV_FORMS
from llm2trt.core.log import configure
from llm2trt.core.quant import DEFAULT_CALIB_SAMPLES, DEFAULT_GROUP_SIZE, DEFAULT_KEEP, METHODS
from llm2trt.entry import RECEIVED, on_sigint, on_sigterm, signal_message

if TYPE_CHECKING:
    from llm2trt.compare import CompareResult
    from llm2trt.core.quant import QuantRequest
    from llm2trt.core.records import Record

F = TypeVar("F", bound=Callable[..., Any])

PATH = click.Path(path_type=Path)


@dataclass
class Context:
    as_json: bool
    verbosity: int
    emitted: bool = False

    def emit(self, record: Record) -> None:
        """The command's result: the record as JSON on stdout with --json, else rendered."""
        self.emitted = True
        if self.as_json:
            click.echo(json.dumps({"ok": True, **record.to_dict()}, default=str))
        else:
            click.echo(record.render())


def _fail(ctx: Context, message: str, code: int) -> NoReturn:
    if ctx.as_json and not ctx.emitted:  # one JSON object on stdout, whatever happens
        click.echo(json.dumps({"ok": False, "error": message}))
    click.echo(f"llm2trt: error: {message}", err=True)
    sys.exit(code)


def common_options(fn: F) -> F:
    """The option group every command shares, and its error handling."""

    @click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
    @click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: tracebacks too).")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
    @functools.wraps(fn)
    def wrapper(as_json: bool, verbose: int, quiet: bool, **kwargs: Any) -> None:
        verbosity = -1 if quiet else verbose
        configure(verbosity)
        _quiet_third_party(verbosity)
        ctx = Context(as_json, verbosity)
        try:
            with _sigterm_raises():
                fn(ctx, **kwargs)
        except Llm2TrtError as exc:
            if verbosity >= 2:
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
            _internal(ctx, exc, verbosity)
        except Exception as exc:  # a bug of ours: still one line, the traceback on request
            if RECEIVED:  # a signal that a C extension turned into its own error (ImportError mid-import)
                _fail(ctx, signal_message(RECEIVED[-1]), 128 + RECEIVED[-1])
            _internal(ctx, exc, verbosity)

    return wrapper  # type: ignore[return-value]


# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, writes fail).
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _internal(ctx: Context, exc: Exception, verbosity: int) -> NoReturn:
    """A bug of ours: still one line, the traceback on request."""
    if verbosity >= 2:
        traceback.print_exc()
    _fail(ctx, f"internal error: {type(exc).__name__}: {str(exc).strip()[:500]} (rerun with -vv for the traceback)", 3)


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


def output_options(fn: F) -> F:
    fn = click.option("--force", is_flag=True, help="Replace OUT if it is an existing llm2trt artifact.")(fn)
    return click.option("-o", "--output", "out", type=PATH, required=True, help="Output artifact directory.")(fn)


def _quiet_third_party(verbosity: int) -> None:
    import logging
    import os
    import warnings

    if verbosity < 1:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        warnings.filterwarnings("ignore")
        for name in ("transformers", "torch", "onnxscript", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if verbosity < 0:  # -q: not even progress bars (transformers' own, and the GGUF reader's plain tqdm)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


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
    as_json = "--json" in args  # read before parsing: click's parser pops from this list
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, CommandLineError):
        raise  # a bare `llm2trt debug` prints its help
    except click.UsageError as exc:
        raise CommandLineError(exc, as_json) from None


class _Command(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(args):
            return super().parse_args(ctx, args)


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm2trt")
def cli() -> None:
    """Hugging Face / PyTorch transformers to validated TensorRT engines through ONNX.

    \b
    convert   a model (HF directory, .gguf, tiny:<arch>) to an ONNX artifact
    optimize  run graph passes over an artifact
    build     compile an artifact into a TensorRT engine
    compare   check an artifact's outputs against PyTorch (and other runners)
    debug     find the first layer whose outputs go wrong (bisect)
    eval      perplexity of a text under an artifact (ppl)
    generate  text from a decoder artifact
    inspect   show what an artifact holds
    """


@cli.command()
@click.argument("model")
@output_options
@click.option(
    "--dtype",
    type=click.Choice(DType.float_choices()),
    default=DType.FP32.value,
    show_default=True,
    help="Weights and activations dtype of the exported graph (engines are strongly typed).",
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset of the export.")
@click.option(
    "--attn-implementation",
    type=click.Choice(["sdpa", "eager"]),
    default="sdpa",
    show_default=True,
    help="transformers attention implementation traced into the graph.",
)
@click.option(
    "--kv-cache/--no-kv-cache",
    default=True,
    show_default=True,
    help="Decoders: KV-cache inputs and outputs (one graph for prefill and decode).",
)
@common_options
def convert(
    ctx: Context, model: str, out: Path, force: bool, dtype: str, opset: int, attn_implementation: str, kv_cache: bool
) -> None:
    """Export MODEL (a Hugging Face directory or model id in the local cache, a .gguf file, or
    tiny:gpt2|llama|bert|vit) to ONNX."""
    from llm2trt.core.artifact import check_output
    from llm2trt.export import convert as run_convert
    from llm2trt.models import resolve_model

    check_output(out, force)
    source = resolve_model(model)
    kind = DType.parse(dtype)
    result = run_convert(
        source, out, dtype=kind, opset=opset, attn_implementation=attn_implementation, kv_cache=kv_cache, force=force
    )
    ctx.emit(result)


def quant_options(fn: Callable[..., None]) -> Callable[..., None]:
    """--quant and what goes with it, handed to the command as one checked `QuantRequest` (or None)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, quant: str | None, keep: tuple[str, ...], calib: Path | None, **kwargs: Any) -> None:
        settings = {k: kwargs.pop(k) for k in ("calib_samples", "group_size", "alpha", "keep_sensitive")}
        request = None
        if quant is not None:
            from llm2trt.core.quant import QuantRequest

            where = str(calib) if calib is not None else None
            request = QuantRequest(quant, keep=list(keep or DEFAULT_KEEP), calib=where, **settings)
        elif calib is not None or keep or settings["keep_sensitive"]:
            raise InputError("--calib, --keep and --keep-sensitive go with --quant")
        fn(*args, quant=request, **kwargs)

    options = [
        click.option(
            "--quant",
            type=click.Choice(METHODS.names()),
            help="Insert Q/DQ on the linear layers: int8-sq (SmoothQuant W8A8), fp8 (E4M3 W8A8), int8-wo, "
            "int4-rtn, int4-awq (weight-only; INT4 in blocks of --group-size input channels).",
        ),
        click.option("--calib", type=PATH, metavar="TEXTFILE", help="Calibration text (int8-sq, fp8, int4-awq)."),
        click.option(
            "--calib-samples",
            type=int,
            default=DEFAULT_CALIB_SAMPLES,
            show_default=True,
            help="Calibration windows (512 tokens each) taken from the text.",
        ),
        click.option("--group-size", type=int, default=DEFAULT_GROUP_SIZE, show_default=True, help="INT4 block size."),
        click.option(
            "--alpha",
            type=float,
            help="SmoothQuant migration strength in [0, 1]; by default searched per layer group on calibration data.",
        ),
        click.option(
            "--keep",
            multiple=True,
            metavar="REGEX",
            help="Leave linear layers whose module matches in high precision; repeatable (default: lm_head).",
        ),
        click.option(
            "--keep-sensitive",
            type=int,
            default=0,
            show_default=True,
            metavar="N",
            help="int8-sq/fp8: also leave the N layer groups whose quantized outputs err most on the calibration "
            "data in high precision (each group's error is in the manifest).",
        ),
    ]
    decorated: Callable[..., None] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


@cli.command()
@click.argument("artifact", type=PATH)
@output_options
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run input and optimized graphs in ONNX Runtime and fail if they diverge.",
)
@click.option(
    "--skip-fusion",
    multiple=True,
    metavar="NAME",
    help="Turn one fusion off by the name optimize reports (e.g. Attention, Gelu); repeatable.",
)
@click.option(
    "--allow-missing-fusions",
    is_flag=True,
    help="Write the graph even when an expected fusion did not happen (it still warns).",
)
@click.option("--kv-cache", is_flag=True, help="Insert KV-cache I/O into a decoder graph that has none.")
@click.option(
    "--kv-form",
    type=click.Choice(KV_FORMS),
    help="KV cache form: growing (Concat; the exporter's), fixed (a buffer updated by TensorScatter), or gqa "
    "(ONNX Runtime's GroupQueryAttention decoder, for its CUDA provider; not for TensorRT).",
)
@click.option(
    "--tp",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Tensor parallelism: write one graph per rank under OUT/rank{r}/ (checked together with gloo).",
)
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="NAME",
    help="Rewrite this plugin's pattern into its llm2trt op (see `llm2trt plugins`); repeatable.",
)
@common_options
@quant_options
def optimize(
    ctx: Context,
    artifact: Path,
    out: Path,
    force: bool,
    check: bool,
    skip_fusion: tuple[str, ...],
    allow_missing_fusions: bool,
    kv_cache: bool,
    kv_form: str | None,
    tp: int,
    plugins: tuple[str, ...],
    quant: QuantRequest | None,
) -> None:
    """Run the pass pipeline (cleanup, fusions, quantization, KV cache) over ARTIFACT and write the
    result to OUT."""
    from llm2trt.optimize import KVRequest
    from llm2trt.optimize import optimize as run_optimize
    from llm2trt.passes.pipeline import PipelineOptions
    from llm2trt.plugins import find

    # Plugins sit above passes: their specs (rules, reference body) reach the pass as pipeline data.
    options = PipelineOptions(skip_fusions=skip_fusion, data={"plugins": [find(name) for name in plugins]})
    kv = KVRequest(insert=kv_cache, form=kv_form)  # type: ignore[arg-type]
    result = run_optimize(
        artifact,
        out,
        check=check,
        force=force,
        options=options,
        kv=kv,
        allow_missing_fusions=allow_missing_fusions,
        quant=quant,
        tp=tp,
    )
    ctx.emit(result)


@cli.command()
@click.argument("artifact", type=PATH)
@output_options
@click.option(
    "--compute-capability",
    metavar="SM",
    help="Build ahead of time for this GPU (TensorRT-RTX: sm75 sm80 sm86 sm89 sm120 sm121).",
)
@click.option(
    "--profile",
    multiple=True,
    metavar="DIM=MIN:OPT:MAX",
    help="Override a dynamic dim's optimization-profile range, e.g. sequence=1:256:2048.",
)
@click.option(
    "--profiles",
    "profiles_file",
    type=PATH,
    help='Optimization profiles from a JSON file: {"profiles": [{"name": "short", "dims": {"sequence": '
    '"1:64:128"}}, ...]}, one engine profile each (a KV graph gets a prefill and a decode one per entry).',
)
@click.option(
    "--opt-level",
    type=int,
    metavar="0-5",
    help="TensorRT's builder optimization level (default 3): higher searches longer for faster kernels.",
)
@click.option("--timing-cache", type=PATH, help="Timing cache file to read and update (full TensorRT).")
@click.option("--strip-weights", is_flag=True, help="Build a weight-stripped engine (full TensorRT).")
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]),
    default="auto",
    show_default=True,
    help="TensorRT flavour; auto prefers full TensorRT.",
)
@common_options
def build(
    ctx: Context,
    artifact: Path,
    out: Path,
    force: bool,
    compute_capability: str | None,
    profile: tuple[str, ...],
    profiles_file: Path | None,
    opt_level: int | None,
    timing_cache: Path | None,
    strip_weights: bool,
    backend: str,
) -> None:
    """Compile ARTIFACT into a TensorRT engine in OUT (model.engine, build.json)."""
    from llm2trt.build import build as run_build

    built = run_build(
        artifact,
        out,
        compute_capability=compute_capability,
        profile=profile,
        timing_cache=timing_cache,
        strip_weights=strip_weights,
        backend=backend,
        force=force,
        verbosity=ctx.verbosity,
        opt_level=opt_level,
        profiles_file=profiles_file,
    )
    ctx.emit(built)


@dataclass(frozen=True)
class Comparing:
    """The shared options of compare and debug bisect, as one value."""

    runners: list[str]
    runners_given: bool  # --runners on the command line (else the default)
    atol: float | None
    rtol: float | None
    batch: int
    sequence: int
    seed: int

    def sample(self) -> dict[str, Any]:
        return {"batch": self.batch, "sequence": self.sequence, "seed": self.seed, "atol": self.atol, "rtol": self.rtol}


def comparison_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Runners, tolerances and sample inputs, handed to the command as one `Comparing`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, runners: str, atol: float | None, rtol: float | None, **kwargs: Any) -> None:
        batch, sequence, seed = kwargs.pop("batch"), kwargs.pop("sequence"), kwargs.pop("seed")
        given = click.get_current_context().get_parameter_source("runners") != click.core.ParameterSource.DEFAULT
        names = [r.strip() for r in runners.split(",") if r.strip()]
        fn(*args, comparing=Comparing(names, given, atol, rtol, batch, sequence, seed), **kwargs)

    options = [
        click.option(
            "--runners",
            default="torch,ort",
            show_default=True,
            help="Comma-separated runners; the first is the reference (torch, ort, trt).",
        ),
        click.option(
            "--atol",
            type=click.FloatRange(min=0),
            help="Absolute tolerance (default: rtol x max|reference| per output).",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0),
            help="Relative tolerance (default by dtype: fp32 1e-4, fp16 1e-2, bf16 5e-2).",
        ),
        click.option(
            "--batch", type=click.IntRange(1), default=3, show_default=True, help="Batch of the sample inputs."
        ),
        click.option(
            "--sequence",
            type=click.IntRange(1),
            default=12,
            show_default=True,
            help="Sequence length of the sample inputs (KV graphs: new tokens, after half as many cached).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample inputs."),
    ]
    decorated: Callable[..., None] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


@cli.command()
@click.argument("artifact", type=PATH)
@click.option(
    "--mark",
    default="none",
    show_default=True,
    metavar="none|all|REGEX",
    help="Also compare intermediate tensors: every PyTorch module output (all), or those whose tensor "
    "or module name matches REGEX; layer by layer.",
)
@click.option("--save-golden", type=PATH, help="Write the inputs and every compared tensor (.npz) for CI checks.")
@click.option("--check-golden", type=PATH, help="Re-run a golden file's runner and inputs; exit 1 on a regression.")
@common_options
@comparison_options
def compare(
    ctx: Context, comparing: Comparing, mark: str, save_golden: Path | None, check_golden: Path | None, artifact: Path
) -> None:
    """Compare ARTIFACT's outputs between runners (PyTorch is the reference); exit 1 on a breach."""
    from llm2trt.core.errors import CheckFailed, InputError

    result: CompareResult
    if check_golden is not None:
        if save_golden is not None or mark != "none":
            raise InputError("--check-golden re-runs the golden file's own tensors: drop --save-golden and --mark")
        from llm2trt.debug import check_golden as run_check

        # Unless --runners is given, the runner the golden was saved from re-runs.
        runner = comparing.runners[-1] if comparing.runners_given else None
        result = run_check(artifact, check_golden, runner=runner, atol=comparing.atol, rtol=comparing.rtol)
    elif mark != "none" or save_golden is not None:
        from llm2trt.debug import compare_marked

        result = compare_marked(artifact, comparing.runners, mark=mark, save_golden=save_golden, **comparing.sample())
    else:
        from llm2trt.compare import compare as run_compare

        result = run_compare(artifact, comparing.runners, verbosity=ctx.verbosity, **comparing.sample())
    ctx.emit(result)
    if not result.passed:
        raise CheckFailed(result.breach_message())


@cli.group()
def debug() -> None:
    """Find where an artifact's numbers go wrong."""


@debug.command()
@click.argument("artifact", type=PATH)
@common_options
@comparison_options
def bisect(ctx: Context, comparing: Comparing, artifact: Path) -> None:
    """Find the first layer, then module, whose output is beyond tolerance, by halving; exit 1 if one is."""
    from llm2trt.core.errors import CheckFailed
    from llm2trt.debug import bisect as run_bisect

    result = run_bisect(artifact, comparing.runners, **comparing.sample())
    ctx.emit(result)
    if result.diverged:
        raise CheckFailed(result.message())


@cli.group(name="eval")
def eval_group() -> None:
    """Measure an artifact's quality."""


@eval_group.command()
@click.argument("artifact", type=PATH)
@click.option("--text", type=PATH, required=True, help="UTF-8 text file to score (tokenized whole).")
@click.option(
    "--window", type=click.IntRange(2), default=512, show_default=True, help="Tokens per window (no context carried)."
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@common_options
def ppl(ctx: Context, artifact: Path, text: Path, window: int, provider: str) -> None:
    """Perplexity of TEXT under a decoder ARTIFACT, in ONNX Runtime."""
    from llm2trt.evaluate import perplexity

    ctx.emit(perplexity(artifact, text, window=window, provider=provider))


def _parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    from llm2trt.core.errors import InputError

    try:
        return [[int(x) for x in value.replace(" ", "").split(",") if x] for value in values]
    except ValueError:
        raise InputError(f"--ids takes comma-separated token ids, e.g. --ids 1,2,3 (got {' '.join(values)})") from None


@cli.command()
@click.argument("artifact", type=PATH)
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--ids", multiple=True, metavar="ID,ID,...", help="A prompt as token ids; repeat for a batch.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--runner",
    default="ort",
    show_default=True,
    help="ort (ONNX Runtime), trt (the engine of a build directory) or torch (transformers, the reference).",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="For ort.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k likeliest (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sample from the smallest set of mass p.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat template.")
@common_options
def generate(
    ctx: Context,
    artifact: Path,
    prompts: tuple[str, ...],
    ids: tuple[str, ...],
    max_new_tokens: int,
    runner: str,
    provider: str,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    chat: bool,
) -> None:
    """Generate text from a decoder ARTIFACT (greedy unless --temperature); tokens stream as they come."""
    from llm2trt.generate import Sampling
    from llm2trt.generate import generate as run_generate

    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    stream = None if ctx.as_json or ctx.verbosity < 0 or not sys.stdout.isatty() else _echo_inline
    result = run_generate(
        artifact,
        prompts=prompts,
        ids=_parse_ids(ids),
        sampling=sampling,
        runner=runner,
        providers=providers,
        chat=chat,
        stream=stream,
    )
    if stream is not None:
        click.echo()
        ctx.emitted = True  # the text is out already
        return
    ctx.emit(result)


def _echo_inline(text: str) -> None:
    click.echo(text, nl=False)


@cli.command(name="plugins")
@common_options
def plugins_cmd(ctx: Context) -> None:
    """List the plugins this install provides: ONNX op, TensorRT plugin, whether its kernel runs here."""
    from llm2trt.plugins import listing
    from llm2trt.trt import load_backend

    try:
        backend = load_backend()
        note = f"builds here use {backend.display} {backend.version}: " + (
            "plugins are registered" if backend.supports("plugins") else "each op's reference body is inlined"
        )
    except Llm2TrtError as exc:
        note = f"no TensorRT here ({exc})"
    ctx.emit(listing(note))


@cli.command()
@click.argument("engine_dir", type=PATH)
@click.option("--weights", type=PATH, required=True, help="The artifact whose weights fill the engine.")
@click.option("-o", "--output", "out", type=PATH, help="Write the refitted engine directory here (default: in place).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@common_options
def refit(ctx: Context, engine_dir: Path, weights: Path, out: Path | None, force: bool) -> None:
    """Fill a weight-stripped engine (build --strip-weights) with the weights of an artifact (full TensorRT)."""
    from llm2trt.refit import refit as run_refit

    ctx.emit(run_refit(engine_dir, weights, out, force=force))


@cli.command(name="inspect")
@click.argument("artifact", type=PATH)
@click.option("--verify", is_flag=True, help="Check the weights against the sha256 recorded when they were written.")
@common_options
def inspect_cmd(ctx: Context, artifact: Path, verify: bool) -> None:
    """Show ARTIFACT's manifest, I/O, op counts and fusion counts (or a bare .onnx file's)."""
    from llm2trt.inspect import inspect

    ctx.emit(inspect(artifact, verify))


def main() -> None:
    from llm2trt.core.memory import return_freed_buffers

    return_freed_buffers()
    cli(prog_name="llm2trt")
