"""`llm2trt inspect`, `llm2trt plugins` and `llm2trt refit`: what an artifact, this install or an
engine directory holds (refit fills a weight-stripped engine's)."""

from __future__ import annotations

from pathlib import Path

import click

from llm2trt.cli.options import COMMON, PATH, Context


@click.argument("artifact", type=PATH)
@click.option("--verify", is_flag=True, help="Check the weights against the sha256 recorded when they were written.")
@COMMON
def inspect(ctx: Context, artifact: Path, verify: bool) -> None:
    """Show ARTIFACT's manifest, I/O, op counts and fusion counts (or a bare .onnx file's)."""
    from llm2trt.inspect.driver import inspect as run_inspect

    ctx.emit(run_inspect(artifact, verify))


@COMMON
def plugins(ctx: Context) -> None:
    """List the plugins this install provides: ONNX op, TensorRT plugin, whether its kernel runs here."""
    from llm2trt.backends.tensorrt.adapter import load_backend
    from llm2trt.core.errors import Llm2TrtError
    from llm2trt.plugins import listing

    try:
        backend = load_backend()
        note = f"builds here use {backend.display} {backend.version}: " + (
            "plugins are registered" if backend.supports("plugins") else "each op's reference body is inlined"
        )
    except Llm2TrtError as exc:
        note = f"no TensorRT here ({exc})"
    ctx.emit(listing(note))


@click.argument("engine_dir", type=PATH)
@click.option("--weights", type=PATH, required=True, help="The artifact whose weights fill the engine.")
@click.option("-o", "--output", "out", type=PATH, help="Write the refitted engine directory here (default: in place).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@COMMON
def refit(ctx: Context, engine_dir: Path, weights: Path, out: Path | None, force: bool) -> None:
    """Fill a weight-stripped engine (build --strip-weights) with the weights of an artifact (full TensorRT)."""
    from llm2trt.build.refit import refit as run_refit

    ctx.emit(run_refit(engine_dir, weights, out, force=force))
