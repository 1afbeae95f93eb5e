"""`llm2trt generate` and `llm2trt eval ppl`: text and perplexity from a decoder artifact."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llm2trt.cli.options import COMMON, PATH, Context


def _parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    from llm2trt.core.errors import InputError

    try:
        return [[int(x) for x in value.replace(" ", "").split(",") if x] for value in values]
    except ValueError:
        raise InputError(f"--ids takes comma-separated token ids, e.g. --ids 1,2,3 (got {' '.join(values)})") from None


@click.argument("artifact", type=PATH)
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--ids", multiple=True, metavar="ID,ID,...", help="A prompt as token ids; repeat for a batch.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--runner",
    help="ort (ONNX Runtime), trt (the engine of a build directory) or torch (transformers, the reference). "
    "Default: trt for an engine directory, else ort.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="For ort.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k likeliest (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Sample from the smallest set of mass p.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat template.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]DIR|NAME|none",
    help="A PEFT LoRA adapter for a graph with LoRA slots (optimize --lora-slots): once for every prompt, "
    "or once per prompt in order (NAME reuses an adapter named before; none: the base model).",
)
@COMMON
def generate(
    ctx: Context,
    artifact: Path,
    prompts: tuple[str, ...],
    ids: tuple[str, ...],
    max_new_tokens: int,
    runner: str | None,
    provider: str,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    chat: bool,
    adapters: tuple[str, ...],
) -> None:
    """Generate text from a decoder ARTIFACT (greedy unless --temperature); tokens stream as they come."""
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate as run_generate

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
        adapters=adapters,
    )
    if stream is not None:
        click.echo()
        ctx.emitted = True  # the text is out already
        return
    ctx.emit(result)


def _echo_inline(text: str) -> None:
    click.echo(text, nl=False)


def eval_group() -> None:
    """Measure an artifact's quality."""


@click.argument("artifact", type=PATH)
@click.option("--text", type=PATH, required=True, help="UTF-8 text file to score (tokenized whole).")
@click.option(
    "--window", type=click.IntRange(2), default=512, show_default=True, help="Tokens per window (no context carried)."
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@COMMON
def ppl(ctx: Context, artifact: Path, text: Path, window: int, provider: str) -> None:
    """Perplexity of TEXT under a decoder ARTIFACT, in ONNX Runtime."""
    from llm2trt.generate.evaluate import perplexity

    ctx.emit(perplexity(artifact, text, window=window, provider=provider))
