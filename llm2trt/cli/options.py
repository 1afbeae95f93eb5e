"""Option groups: each a class that adds its options to a command and parses their values into the
one typed value the stage takes (`QuantArgs` -> `QuantRequest`, `KVArgs` -> `KVRequest`), the way
Polygraphy's argument groups do for argparse.

A group's options are listed in `--help` where its decorator stands, and its parsing runs before the
command's body. Vocabularies that live in slow modules (dtypes import NumPy, ONNX and the float8 types) are
read only when a command's help or parsing needs them, so `llm2trt --help` loads none of them.
"""

from __future__ import annotations

import abc
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import click

from llm2trt.core.errors import InputError
from llm2trt.core.kv import KV_FORMS

if TYPE_CHECKING:
    from llm2trt.core.quant import QuantRequest
    from llm2trt.core.records import Record
    from llm2trt.optimize.requests import KVRequest

PATH = click.Path(path_type=Path)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass
class Context:
    """What every command reports through: --json or text, and how much to log."""

    as_json: bool
    verbosity: int
    emitted: bool = False

    def emit(self, record: Record, text: str | None = None) -> None:
        """The command's result: the record as JSON on stdout with --json, else `text` or its rendering."""
        self.emitted = True
        if self.as_json:
            click.echo(json.dumps({"ok": True, **record.to_dict()}, default=str))
        else:
            click.echo(record.render() if text is None else text)


class LazyChoice(click.Choice[str]):
    """A choice whose values come from a module slow to import: read on first use (a command's help,
    or parsing its value), never at the CLI's import."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load: Callable[[], Sequence[str]] | None = load
        self._values: tuple[str, ...] = ()
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._load is not None:
            self._values, self._load = tuple(self._load()), None
        return self._values

    @choices.setter
    def choices(self, values: Sequence[str]) -> None:
        self._values, self._load = tuple(values), None


class LazyDefault(click.Option):
    """An option whose default comes from a module slow to import, read on first use (as LazyChoice)."""

    def __init__(self, *args: Any, default_from: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._default_from: Callable[[], Any] | None = default_from

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if self._default_from is not None:
            self.default, self._default_from = self._default_from(), None
        return super().get_default(ctx, call)


def apply(options: Sequence[Decorator], fn: F) -> F:
    """`fn` with `options` added, listed in `--help` in the order given (click attaches them to the
    function itself: it is returned as it came)."""
    decorated: Callable[..., Any] = fn
    for option in reversed(options):
        decorated = option(decorated)
    return cast(F, decorated)


class ArgGroup(abc.ABC, Generic[T]):
    """Options added to a command together and parsed into one value, passed as the keyword `dest`."""

    dest: ClassVar[str]

    @abc.abstractmethod
    def options(self) -> list[Decorator]:
        """The group's click options, in the order `--help` lists them."""

    @abc.abstractmethod
    def parse(self, values: dict[str, Any]) -> T:
        """Pop the group's own values from the command's keyword arguments and make the typed value."""

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = self.parse(kwargs)
            return fn(*args, **{self.dest: value}, **kwargs)

        return cast(F, apply(self.options(), wrapper))


class CommonArgs(ArgGroup[Context]):
    """--json, -v, -q: every command's. The CLI's group parses them (llm2trt.cli.main) before the
    command runs, to set up logging and report failures, and hands the command the `Context`."""

    dest = "ctx"

    def options(self) -> list[Decorator]:
        return [
            click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout."),
            click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: tracebacks too)."),
            click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr."),
        ]

    def parse(self, values: dict[str, Any]) -> Context:
        as_json, verbose, quiet = values.pop("as_json"), values.pop("verbose"), values.pop("quiet")
        return Context(bool(as_json), -1 if quiet else int(verbose))

    def __call__(self, fn: F) -> F:
        return apply(self.options(), fn)  # the group parses them: no wrapper here


@dataclass(frozen=True)
class Output:
    """Where a command writes its artifact, and whether it may replace one there."""

    path: Path
    force: bool

    def check(self, *reads: Path) -> None:
        """Refuse an output that cannot be written (or is an existing artifact without --force, or
        overlaps an input): commands call it before they load anything slow."""
        from llm2trt.core.artifact import check_output

        check_output(self.path, self.force, reads=reads)


class OutputArgs(ArgGroup[Output]):
    """-o/--output and --force -> the `Output`."""

    dest = "output"

    def options(self) -> list[Decorator]:
        return [
            click.option("-o", "--output", "out", type=PATH, required=True, help="Output artifact directory."),
            click.option("--force", is_flag=True, help="Replace OUT if it is an existing llm2trt artifact."),
        ]

    def parse(self, values: dict[str, Any]) -> Output:
        return Output(values.pop("out"), bool(values.pop("force")))


def _methods() -> list[str]:
    from llm2trt.passes.quant_methods import METHODS

    return METHODS.names()


def _quant_default(name: str) -> Callable[[], int]:
    def default() -> int:
        from llm2trt.core import quant

        value: int = getattr(quant, name)
        return value

    return default


class QuantArgs(ArgGroup["QuantRequest | None"]):
    """--quant and what goes with it -> one checked `QuantRequest` (None without --quant)."""

    dest = "quant"

    def options(self) -> list[Decorator]:
        return [
            click.option(
                "--quant",
                type=LazyChoice(_methods),
                help="Insert Q/DQ on the linear layers: int8-sq (SmoothQuant W8A8), fp8 (E4M3 W8A8), int8-wo, "
                "int4-rtn, int4-awq, int4-gptq (weight-only; INT4 in blocks of --group-size input channels), auto "
                "(per layer group INT4 GPTQ, INT8 or kept, within --max-ppl-increase).",
            ),
            click.option(
                "--calib",
                type=PATH,
                metavar="TEXTFILE",
                help="Calibration text (int8-sq, fp8, int4-awq, int4-gptq, auto); default: the built-in one "
                "(llm2trt/data/calib_default.txt).",
            ),
            click.option(
                "--calib-samples",
                cls=LazyDefault,
                default_from=_quant_default("DEFAULT_CALIB_SAMPLES"),
                type=int,
                show_default=True,
                help="Calibration windows (512 tokens each) taken from the text.",
            ),
            click.option(
                "--group-size",
                cls=LazyDefault,
                default_from=_quant_default("DEFAULT_GROUP_SIZE"),
                type=int,
                show_default=True,
                help="INT4 block size.",
            ),
            click.option(
                "--alpha",
                type=float,
                help="SmoothQuant migration strength in [0, 1]; by default searched per layer group on calibration "
                "data.",
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
                help="int8-sq/fp8: also leave the N layer groups whose quantized outputs err most on the "
                "calibration data in high precision (each group's error is in the manifest).",
            ),
            click.option(
                "--max-ppl-increase",
                type=float,
                metavar="P",
                help="--quant auto: the perplexity increase allowed, in percent, measured on the calibration "
                "text (default 1).",
            ),
        ]

    def parse(self, values: dict[str, Any]) -> QuantRequest | None:
        method: str | None = values.pop("quant")
        calib: Path | None = values.pop("calib")
        keep: tuple[str, ...] = values.pop("keep")
        names = ("calib_samples", "group_size", "alpha", "keep_sensitive", "max_ppl_increase")
        settings = {k: values.pop(k) for k in names}
        if method is None:
            if settings["max_ppl_increase"] is not None:
                raise InputError("--max-ppl-increase goes with --quant auto")
            if calib is not None or keep or settings["keep_sensitive"]:
                raise InputError("--calib, --keep and --keep-sensitive go with --quant")
            return None
        from llm2trt.core.quant import DEFAULT_KEEP, QuantRequest

        where = str(calib) if calib is not None else None
        return QuantRequest(method, keep=list(keep or DEFAULT_KEEP), calib=where, **settings)


class KVArgs(ArgGroup["KVRequest"]):
    """--kv-cache and --kv-form -> the `KVRequest` optimize plans each graph's cache from."""

    dest = "kv"

    def options(self) -> list[Decorator]:
        return [
            click.option("--kv-cache", is_flag=True, help="Insert KV-cache I/O into a decoder graph that has none."),
            click.option(
                "--kv-form",
                type=click.Choice(KV_FORMS),
                help="KV cache form: growing (Concat; the exporter's), fixed (a buffer updated by TensorScatter), "
                "or gqa (ONNX Runtime's GroupQueryAttention decoder, for its CUDA provider; not for TensorRT).",
            ),
            click.option(
                "--kv-dtype",
                type=click.Choice(["int8"]),
                help="With --kv-form gqa: an INT8 cache (static scales per KV head and channel, calibrated on "
                "--calib's text or the built-in one): half the cache bytes a decode step reads.",
            ),
        ]

    def parse(self, values: dict[str, Any]) -> KVRequest:
        from llm2trt.optimize.requests import KVRequest

        form, dtype = values.pop("kv_form"), values.pop("kv_dtype")
        return KVRequest(insert=bool(values.pop("kv_cache")), form=form, dtype=dtype)


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


class ComparisonArgs(ArgGroup[Comparing]):
    """Runners, tolerances and sample inputs -> one `Comparing`."""

    dest = "comparing"

    def options(self) -> list[Decorator]:
        return [
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

    def parse(self, values: dict[str, Any]) -> Comparing:
        runners: str = values.pop("runners")
        given = click.get_current_context().get_parameter_source("runners") != click.core.ParameterSource.DEFAULT
        names = [r.strip() for r in runners.split(",") if r.strip()]
        batch, sequence, seed = values.pop("batch"), values.pop("sequence"), values.pop("seed")
        return Comparing(names, given, values.pop("atol"), values.pop("rtol"), batch, sequence, seed)


def _float_dtypes() -> tuple[str, ...]:
    from llm2trt.core.dtypes import DType

    return DType.float_choices()


def _default_dtype() -> str:
    from llm2trt.core.dtypes import DType

    return DType.FP32.value


def dtype_option() -> Decorator:
    """convert's --dtype: its choices and default from llm2trt.core.dtypes, read when needed."""
    return click.option(
        "--dtype",
        cls=LazyDefault,
        default_from=_default_dtype,
        type=LazyChoice(_float_dtypes),
        show_default=True,
        help="Weights and activations dtype of the exported graph (engines are strongly typed).",
    )


COMMON = CommonArgs()
