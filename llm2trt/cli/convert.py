"""`llm2trt convert`: a model to an ONNX artifact."""

from __future__ import annotations

import click

from llm2trt.cli.options import COMMON, Context, Output, OutputArgs, dtype_option


@click.argument("model")
@OutputArgs()
@dtype_option()
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
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="[NAME=]DIR",
    help="A PEFT LoRA adapter folder to merge into the weights (repeatable; merged in order).",
)
@COMMON
def convert(
    ctx: Context,
    model: str,
    output: Output,
    dtype: str,
    opset: int,
    attn_implementation: str,
    kv_cache: bool,
    loras: tuple[str, ...],
) -> None:
    """Export MODEL (a Hugging Face directory or model id in the local cache, a .gguf file, or
    tiny:gpt2|llama|bert|vit) to ONNX."""
    output.check()  # before the exporter's imports, and the model, load
    from llm2trt.convert.export import convert as run_convert
    from llm2trt.convert.sources import resolve_model
    from llm2trt.core.dtypes import DType

    adapters = []
    if loras:  # read and checked before the model loads
        from llm2trt.convert.lora import read_adapters

        adapters = read_adapters(loras)
    source = resolve_model(model)
    result = run_convert(
        source,
        output.path,
        dtype=DType.parse(dtype),
        opset=opset,
        attn_implementation=attn_implementation,
        kv_cache=kv_cache,
        force=output.force,
        adapters=adapters,
    )
    ctx.emit(result)
