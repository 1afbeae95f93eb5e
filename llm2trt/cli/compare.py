"""`llm2trt compare` and `llm2trt debug bisect`: an artifact's numbers across runners."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from llm2trt.cli.options import COMMON, PATH, Comparing, ComparisonArgs, Context

if TYPE_CHECKING:
    from llm2trt.compare.driver import CompareResult


@click.argument("artifact", type=PATH)
@ComparisonArgs()
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
@COMMON
def compare(
    ctx: Context, comparing: Comparing, mark: str, save_golden: Path | None, check_golden: Path | None, artifact: Path
) -> None:
    """Compare ARTIFACT's outputs between runners (PyTorch is the reference); exit 1 on a breach."""
    from llm2trt.core.errors import CheckFailed, InputError

    result: CompareResult
    if check_golden is not None:
        if save_golden is not None or mark != "none":
            raise InputError("--check-golden re-runs the golden file's own tensors: drop --save-golden and --mark")
        from llm2trt.compare.debug import check_golden as run_check

        # Unless --runners is given, the runner the golden was saved from re-runs.
        runner = comparing.runners[-1] if comparing.runners_given else None
        result = run_check(artifact, check_golden, runner=runner, atol=comparing.atol, rtol=comparing.rtol)
    elif mark != "none" or save_golden is not None:
        from llm2trt.compare.debug import compare_marked

        result = compare_marked(artifact, comparing.runners, mark=mark, save_golden=save_golden, **comparing.sample())
    else:
        from llm2trt.compare.driver import compare as run_compare

        result = run_compare(artifact, comparing.runners, verbosity=ctx.verbosity, **comparing.sample())
    # A decoder's cache outputs (60 on SmolLM2) are one summary line unless -v lists them.
    ctx.emit(result, result.render(verbose=ctx.verbosity > 0))
    if not result.passed:
        raise CheckFailed(result.breach_message())


def debug() -> None:
    """Find where an artifact's numbers go wrong."""


@click.argument("artifact", type=PATH)
@ComparisonArgs()
@COMMON
def bisect(ctx: Context, comparing: Comparing, artifact: Path) -> None:
    """Find the first layer, then module, whose output is beyond tolerance, by halving; exit 1 if one is."""
    from llm2trt.compare.debug import bisect as run_bisect
    from llm2trt.core.errors import CheckFailed

    result = run_bisect(artifact, comparing.runners, **comparing.sample())
    ctx.emit(result)
    if result.diverged:
        raise CheckFailed(result.message())
