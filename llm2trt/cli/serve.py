"""`llm2trt serve`: a decoder artifact behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import click

from llm2trt.cli.options import COMMON, PATH, Context


@click.argument("artifact", type=PATH)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--kv-cache-mb", type=click.IntRange(1), default=512, show_default=True, help="KV-cache pool size.")
@click.option(
    "--block-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="Positions per KV block."
)
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True, help="Requests decoded together.")
@click.option(
    "--chunk-tokens", type=click.IntRange(1), default=256, show_default=True, help="Prompt tokens prefilled per step."
)
@click.option(
    "--max-queue", type=click.IntRange(1), default=1024, show_default=True, help="Waiting requests (429 beyond)."
)
@click.option(
    "--max-body-kb", type=click.IntRange(1), default=1024, show_default=True, help="Request body limit (413 beyond)."
)
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="Require `Authorization: Bearer KEY` on /v1, KEY read from this environment variable.",
)
@click.option("--drain-seconds", type=click.FloatRange(0), default=30.0, show_default=True, help="On SIGTERM.")
@click.option("--name", help="The model's id in the API (default: the artifact's directory name).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=DIR",
    help="A PEFT LoRA adapter for an artifact with LoRA slots (optimize --lora-slots), served as model NAME; "
    "repeat for more (up to the slots).",
)
@COMMON
def serve(
    ctx: Context,
    artifact: Path,
    host: str,
    port: int,
    provider: str,
    kv_cache_mb: int,
    block_size: int,
    max_batch: int,
    chunk_tokens: int,
    max_queue: int,
    max_body_kb: int,
    api_key_env: str | None,
    drain_seconds: float,
    name: str | None,
    adapters: tuple[str, ...],
) -> None:
    """Serve a decoder ARTIFACT: OpenAI /v1/completions and /v1/chat/completions (streamed or whole),
    /v1/models, /health and /metrics, with in-flight batching over a paged KV cache. Stops on SIGTERM
    or Ctrl-C after draining."""
    from llm2trt.core.errors import InputError
    from llm2trt.serve.api import ServeOptions
    from llm2trt.serve.driver import ServeConfig
    from llm2trt.serve.driver import serve as run_serve
    from llm2trt.serve.engine import Limits

    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise InputError(f"--api-key-env: the environment variable {api_key_env} is not set or empty")
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if provider == "cuda" else ("CPUExecutionProvider",)
    config = ServeConfig(
        host=host,
        port=port,
        providers=providers,
        kv_cache_mb=kv_cache_mb,
        block_size=block_size,
        limits=Limits(max_batch=max_batch, chunk_tokens=chunk_tokens, max_queue=max_queue),
        options=ServeOptions(max_body_bytes=max_body_kb << 10, api_key=key),
        drain_seconds=drain_seconds,
        name=name,
        adapters=adapters,
    )
    quiet = ctx.verbosity < 0
    run_serve(
        artifact, config, on_ready=None if quiet else lambda url: click.echo(f"llm2trt: serving on {url}", err=True)
    )
    ctx.emitted = True
