"""`llm2trt optimize`: the pass pipeline over an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from llm2trt.cli.options import COMMON, PATH, Context, KVArgs, Output, OutputArgs, QuantArgs

if TYPE_CHECKING:
    from llm2trt.core.quant import QuantRequest
    from llm2trt.optimize.requests import KVRequest


# What changes the graph first (quantization, cache, ranks, plugins), then the checks and fusions.
@click.argument("artifact", type=PATH)
@OutputArgs()
@QuantArgs()
@KVArgs()
@click.option(
    "--tp",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Tensor parallelism: write one graph per rank under OUT/rank{r}/ (checked together with gloo).",
)
@click.option(
    "--ep",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Expert parallelism (mixture of experts): the ranks in N groups, each holding a block of the "
    "experts (--ep N alone: N ranks).",
)
@click.option(
    "--pp",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Pipeline parallelism: split the layers into N stages under OUT/stage{s}/ (run together with gloo).",
)
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="NAME",
    help="Rewrite this plugin's pattern into its llm2trt op (see `llm2trt plugins`); repeatable.",
)
@click.option(
    "--lora-slots",
    type=int,
    default=0,
    metavar="N",
    help="Runtime LoRA: a low-rank path beside each target linear layer holding N adapters at once, "
    "their weights graph inputs (generate --adapter fills them).",
)
@click.option(
    "--lora-max-rank",
    type=int,
    default=16,
    show_default=True,
    metavar="R",
    help="Runtime LoRA: the largest adapter rank the slots hold (smaller ranks are zero-padded).",
)
@click.option(
    "--lora-targets",
    multiple=True,
    metavar="NAME",
    help="Runtime LoRA: only these layers (a leaf name such as q_proj, or a regex over module names); "
    "repeatable. Default: every linear layer inside the decoder layers.",
)
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
@COMMON
def optimize(
    ctx: Context,
    artifact: Path,
    output: Output,
    quant: QuantRequest | None,
    kv: KVRequest,
    tp: int,
    ep: int,
    pp: int,
    plugins: tuple[str, ...],
    lora_slots: int,
    lora_max_rank: int,
    lora_targets: tuple[str, ...],
    check: bool,
    skip_fusion: tuple[str, ...],
    allow_missing_fusions: bool,
) -> None:
    """Run the pass pipeline (cleanup, fusions, quantization, KV cache) over ARTIFACT and write the
    result to OUT."""
    from llm2trt.core.manifest import Manifest

    # What is wrong with the input or the output is said before the passes and the model's config load.
    Manifest.read(artifact)
    output.check(artifact)
    from llm2trt.optimize.driver import optimize as run_optimize
    from llm2trt.passes.pipeline import PipelineOptions
    from llm2trt.plugins import find

    # Plugins sit above passes: their specs (rules, reference body) reach the pass as pipeline options.
    lora = None
    if lora_targets and not lora_slots:
        from llm2trt.core.errors import InputError

        raise InputError("--lora-targets goes with --lora-slots N")
    if lora_slots:
        from llm2trt.core.lora import LoraRequest

        lora = LoraRequest(lora_slots, lora_max_rank, list(lora_targets))
    options = PipelineOptions(skip_fusions=skip_fusion, plugins=tuple(find(name) for name in plugins), lora=lora)
    result = run_optimize(
        artifact,
        output.path,
        check=check,
        force=output.force,
        options=options,
        kv=kv,
        allow_missing_fusions=allow_missing_fusions,
        quant=quant,
        tp=tp,
        pp=pp,
        ep=ep,
    )
    ctx.emit(result)
