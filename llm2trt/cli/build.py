"""`llm2trt build`: an artifact to a TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import click

from llm2trt.cli.options import COMMON, PATH, Context, Output, OutputArgs


@click.argument("artifact", type=PATH)
@OutputArgs()
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
@COMMON
def build(
    ctx: Context,
    artifact: Path,
    output: Output,
    compute_capability: str | None,
    profile: tuple[str, ...],
    profiles_file: Path | None,
    opt_level: int | None,
    timing_cache: Path | None,
    strip_weights: bool,
    backend: str,
) -> None:
    """Compile ARTIFACT into a TensorRT engine in OUT (model.engine, build.json)."""
    from llm2trt.build.driver import build as run_build

    built = run_build(
        artifact,
        output.path,
        compute_capability=compute_capability,
        profile=profile,
        timing_cache=timing_cache,
        strip_weights=strip_weights,
        backend=backend,
        force=output.force,
        verbosity=ctx.verbosity,
        opt_level=opt_level,
        profiles_file=profiles_file,
    )
    ctx.emit(built)
