"""Load on `llm2trt serve` through the official `openai` client: N concurrent streams of random
token-id prompts, one level of concurrency after another, against llm2trt's own static batch decode
of the same artifact measured in the same run (issue 28).

    python scripts/bench_serve.py ARTIFACT
    python scripts/bench_serve.py ARTIFACT --concurrency 1 16 64 --prompt-tokens 8 64 --output-tokens 16 64
    python scripts/bench_serve.py ARTIFACT --provider cuda --max-batch 256 --json serve.json
    python scripts/bench_serve.py ARTIFACT --url http://127.0.0.1:8000   # a server already running

First the static reference, before any server runs (so the two never share the machine): the artifact
through llm2trt's decoder session (`open_decoder("ort")`, the --provider's ONNX Runtime provider) and
`generate_ids`, greedy, at batch 1 and batch 16, prompts of the middle of --prompt-tokens, for the
largest --output-tokens: decode ms/step and tokens/s (batch x steps / decode seconds). --static-artifact
times another artifact of the same model there: serve runs the growing cache form only, so on a GPU
the reference bench_decode sets (`optimize --kv-form gqa`, the GPU-resident session) is another artifact.

Then, without --url, `python -m llm2trt serve ARTIFACT --port 0` (with --provider, --max-batch,
--chunk-tokens, --kv-cache-mb, --block-size passed on), stopped with SIGTERM at the end (it must exit 0).
One warm-up request, then per level of --concurrency: --requests-per-level requests (default: 4 x the
concurrency, at least 16) sent through asyncio semaphores of that size in all, each a streamed
/v1/completions of random token ids (ids uniform in [3, vocab), lengths uniform in --prompt-tokens;
the workload of a level depends on --seed and the level only), max_tokens uniform in --output-tokens,
temperature 0 (an EOS may end one early: the tokens received are what count). The streams of a level
are spread over --clients processes (stream slot k to client k % clients, request j to slot
j % concurrency): the openai client parses every chunk into its models, a few hundred microseconds a
token, so one Python process caps what it can take in at a few thousand tokens/s.

Per request: TTFT (request sent -> the first chunk that carries tokens) and inter-token latencies
(the gap between successive token-bearing chunks, split evenly over the tokens of the later chunk).
A chunk's tokens are its choice's `token_ids` (llm2trt's extra field); a server without it (another
OpenAI-compatible server behind --url) counts one token per chunk with text.

Per level, one row: concurrency, requests (errors), output tokens/s (tokens received / wall time of the
level), requests/s, TTFT p50/p99 and ITL p50/p99 in ms; then the ratios the issue sets targets on:
tokens/s over the static batch-16 tokens/s (target at 64 streams: >= 1.5) and ITL p99 over the static
batch-1 step (target: <= 3). And who set the pace: the busiest client process's CPU share (near 100%:
the client did; raise --clients) and, from the server's /metrics (a server without them: "-"), its
running batch (the gauge, sampled every 100 ms), tokens per model call (a step's decode and prefill
are separate calls), and its own mean TTFT and inter-token gap, by its clock: a client-side figure
far above the server's is the way there and back (HTTP, the event loops), not the model. The clients
run on the same machine as the server: on a small CPU their work is part of what is measured. With
--url the static reference still runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import ServeError, ServerProcess, print_columns

STATIC_BATCHES = (1, 16)
SERVER_OPTIONS = ("max_batch", "chunk_tokens", "kv_cache_mb", "block_size")  # passed on to `llm2trt serve`


class UserError(Exception):
    """A mistake in what was asked: one line, no traceback."""


# -- the workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]


def workload(count: int, vocab: int, prompt: Sequence[int], output: Sequence[int], seed: int, level: int) -> Workload:
    """`count` requests: random ids in [3, vocab), lengths and max_tokens uniform in their (inclusive) ranges."""
    rng = np.random.default_rng([seed, level])
    lengths = rng.integers(prompt[0], prompt[1] + 1, size=count)
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]
    return Workload(prompts, rng.integers(output[0], output[1] + 1, size=count).tolist())


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None


# -- the static reference ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Static:
    batch: int
    prompt_tokens: int
    steps: int
    ms_per_step: float
    tokens_per_s: float


def providers_for(provider: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]


def static_reference(
    artifact: Path, provider: str, prompt_tokens: int, new_tokens: int, seed: int, longest: int
) -> list[Static]:
    """llm2trt's static batch decode of the artifact at batch 1 and 16 (after a short warm-up each);
    refused where the longest prompt of the load plus `new_tokens` would not fit the artifact."""
    from llm2trt.backends.base import DecoderContext
    from llm2trt.backends.decoder import decoder_graph, position_limit
    from llm2trt.backends.registry import open_decoder
    from llm2trt.core.manifest import Manifest
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate_ids

    manifest = Manifest.read(artifact)
    graph = decoder_graph(manifest)
    eos = manifest.generation.eos_token_ids if manifest.generation else []
    vocab = vocab_of(artifact)
    limit = position_limit(graph, manifest)
    if limit is not None and longest + new_tokens > limit:
        raise UserError(f"{longest} prompt tokens plus {new_tokens} new ones: this artifact holds {limit} positions")
    rows = []
    for batch in STATIC_BATCHES:
        ids = np.random.default_rng([seed, batch]).integers(3, vocab, size=(batch, prompt_tokens)).tolist()
        ctx = DecoderContext(artifact, manifest, graph, prompt_tokens + new_tokens, providers_for(provider))
        session = open_decoder("ort", ctx)
        generate_ids(session, ids, Sampling(max_new_tokens=min(4, new_tokens)), eos)  # warm-up
        _new, _stops, (_prefill, seconds, steps) = generate_ids(session, ids, Sampling(max_new_tokens=new_tokens), eos)
        if steps == 0:
            raise UserError(f"the static batch {batch} made no decode step (EOS at once, or --output-tokens 1)")
        rows.append(Static(batch, prompt_tokens, steps, seconds / steps * 1e3, batch * steps / seconds))
    return rows


# -- the server -------------------------------------------------------------------------------------


def server_options(args: argparse.Namespace) -> list[str]:
    options = ["--provider", args.provider]
    for name in SERVER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    return options


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    clients: int
    client_cpu: float  # the busiest client process's CPU seconds / the level's wall seconds
    server: dict[str, float]  # /metrics over the level: engine steps, tokens per step, its own ITL mean
    first_error: str | None


def chunk_tokens(chunk: Any) -> int:
    """Tokens a streamed chunk carries: its `token_ids` (llm2trt's extra field), else 1 per text piece."""
    count = 0
    for choice in chunk.choices:
        ids = (choice.model_extra or {}).get("token_ids")
        count += len(ids) if ids is not None else int(bool(choice.text))
    return count


async def one_request(client: Any, model: str, prompt: list[int], max_tokens: int) -> Outcome:
    import openai

    out = Outcome()
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            count = chunk_tokens(chunk)
            if not count:
                continue
            now = time.perf_counter()
            if out.ttft is None:
                out.ttft = now - start
            else:
                out.gaps += [(now - last) / count] * count
            last, out.tokens = now, out.tokens + count
    except openai.OpenAIError as exc:
        out.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return out


def client_for(url: str, concurrency: int, timeout: float) -> Any:
    """The official client, its connection pool as large as its streams (the default keeps 100 alive)."""
    import openai

    try:
        import httpx2 as http
    except ImportError:  # openai before its move to httpx2
        import httpx as http  # type: ignore[no-redef]
    limits = http.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    http_client = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout, http_client=http_client
    )


async def streams(url: str, model: str, concurrency: int, work: Workload, timeout: float) -> list[Outcome]:
    """`work`'s requests, at most `concurrency` of them streaming at once."""
    client = client_for(url, concurrency, timeout)
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: list[int], max_tokens: int) -> Outcome:
        async with gate:
            return await one_request(client, model, prompt, max_tokens)

    try:
        return await asyncio.gather(*(gated(p, n) for p, n in zip(work.prompts, work.max_tokens, strict=True)))
    finally:
        await client.close()


def client_share(url: str, model: str, concurrency: int, work: Workload, timeout: float) -> dict[str, Any]:
    """One client process's part of a level, in plain types (it crosses back to the parent)."""
    cpu, start = time.process_time(), time.perf_counter()
    outcomes = asyncio.run(streams(url, model, concurrency, work, timeout))
    end = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes
    return {
        "start": start,
        "end": end,
        "cpu": time.process_time() - cpu,
        "ttft": [o.ttft for o in outcomes if o.ttft is not None],
        "gaps": [g for o in outcomes for g in o.gaps],
        "tokens": sum(o.tokens for o in outcomes),
        "requests": len(outcomes),
        "errors": [o.error for o in outcomes if o.error is not None],
    }


def split(concurrency: int, clients: int, work: Workload) -> list[tuple[int, Workload]]:
    """Stream slot k of the level belongs to client k % clients, request j to slot j % concurrency:
    each client's share of the requests is its share of the streams."""
    count = min(clients, concurrency)
    parts = []
    for c in range(count):
        mine = [j for j in range(len(work.prompts)) if j % concurrency % count == c]
        share = Workload([work.prompts[j] for j in mine], [work.max_tokens[j] for j in mine])
        parts.append((len(range(c, concurrency, count)), share))
    return parts


def server_metrics(url: str) -> dict[str, float]:
    """The server's /metrics counters ({} from a server without them)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def server_delta(before: dict[str, float], after: dict[str, float], running: list[float]) -> dict[str, float]:
    """What the server's /metrics say of a level: its model calls, tokens per call, mean TTFT and
    inter-token gap by its own clock, and the mean of its running batch as sampled ({}: no such metrics)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps, tokens = delta("llm2trt_engine_steps_total"), delta("llm2trt_generation_tokens_total")
    if not steps:
        return {}
    out = {"engine_steps": steps, "tokens_per_step": tokens / steps}
    for key, name in (("ttft_mean_ms", "time_to_first_token"), ("itl_mean_ms", "inter_token_latency")):
        count = delta(f"llm2trt_{name}_seconds_count")
        if count:
            out[key] = delta(f"llm2trt_{name}_seconds_sum") / count * 1e3
    if running:
        out["running_mean"] = sum(running) / len(running)
    return out


def sample_running(url: str, stop: threading.Event, into: list[float]) -> None:
    """The server's running batch (its gauge), every 100 ms until `stop`."""
    while not stop.wait(0.1):
        value = server_metrics(url).get("llm2trt_requests_running")
        if value is not None:
            into.append(value)


def run_level(pool: Any, url: str, model: str, concurrency: int, work: Workload, args: argparse.Namespace) -> Level:
    """One level, its streams spread over the client processes of `pool`."""
    jobs = [(url, model, c, share, args.timeout) for c, share in split(concurrency, args.clients, work)]
    before, running, stop = server_metrics(url), list[float](), threading.Event()
    sampler = threading.Thread(target=sample_running, args=(url, stop, running), daemon=True)
    sampler.start()
    try:
        parts = pool.starmap(client_share, jobs, chunksize=1)
    finally:
        stop.set()
        sampler.join()
    after = server_metrics(url)
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    ttfts = [t for p in parts for t in p["ttft"]]
    gaps = [g for p in parts for g in p["gaps"]]
    tokens, errors = sum(p["tokens"] for p in parts), [e for p in parts for e in p["errors"]]
    requests = sum(p["requests"] for p in parts)
    return Level(
        concurrency,
        requests,
        len(errors),
        tokens,
        seconds,
        tokens / seconds,
        (requests - len(errors)) / seconds,
        percentile_ms(ttfts, 50),
        percentile_ms(ttfts, 99),
        percentile_ms(gaps, 50),
        percentile_ms(gaps, 99),
        len(parts),
        max(p["cpu"] / max(p["end"] - p["start"], 1e-9) for p in parts),
        server_delta(before, after, running),
        errors[0] if errors else None,
    )


async def model_id(url: str) -> str:
    """The server's model id (/v1/models); a clear error where nothing answers there."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        models = [m.id async for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise UserError(f"no OpenAI API at {url}: {exc}") from None
    finally:
        await client.close()
    if not models:
        raise UserError(f"the server at {url} lists no model")
    return models[0]


async def warm_up(url: str, args: argparse.Namespace, vocab: int) -> str:
    """The model's id, after one short request (the first model calls are slower)."""
    model = await model_id(url)
    warm = workload(1, vocab, args.prompt_tokens, (min(args.output_tokens[0], 8),) * 2, args.seed, 0)
    client = client_for(url, 1, args.timeout)
    try:
        warmed = await one_request(client, model, warm.prompts[0], warm.max_tokens[0])
    finally:
        await client.close()
    if warmed.error is not None:
        raise UserError(f"the warm-up request failed: {warmed.error}")
    return model


def import_openai() -> None:
    import openai  # noqa: F401  (a client process imports it once, before the first level)


def load_levels(url: str, args: argparse.Namespace, vocab: int) -> list[Level]:
    import multiprocessing

    model = asyncio.run(warm_up(url, args, vocab))
    levels = []
    with multiprocessing.get_context("spawn").Pool(args.clients, initializer=import_openai) as pool:
        for concurrency in args.concurrency:
            count = args.requests_per_level or max(16, 4 * concurrency)
            work = workload(count, vocab, args.prompt_tokens, args.output_tokens, args.seed, concurrency)
            level = run_level(pool, url, model, concurrency, work, args)
            print(f"  {concurrency} streams: {level.tokens_per_s:.1f} tokens/s over {level.seconds:.1f} s", flush=True)
            levels.append(level)
    return levels


# -- output -----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(statics: list[Static], levels: list[Level]) -> None:
    print("\nstatic batch decode (llm2trt decoder session, greedy, same process)")
    rows = [["batch", "prompt", "steps", "ms/step", "tokens/s"]]
    rows += [
        [str(s.batch), str(s.prompt_tokens), str(s.steps), fmt(s.ms_per_step, 2), fmt(s.tokens_per_s)] for s in statics
    ]
    print_columns(rows, rule=True)
    print("\nserve (openai client, streamed /v1/completions; latencies in ms)")
    head = ["streams", "requests", "errors", "tokens", "tokens/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50"]
    rows = [[*head, "ITL p99"]]
    for v in levels:
        counts = [str(v.concurrency), str(v.requests), str(v.errors), str(v.tokens), fmt(v.tokens_per_s)]
        times = [fmt(v.ttft_p50_ms), fmt(v.ttft_p99_ms), fmt(v.itl_p50_ms, 2), fmt(v.itl_p99_ms, 2)]
        rows.append([*counts, fmt(v.requests_per_s, 2), *times])
    print_columns(rows, rule=True)
    print("\nwho set the pace: the clients' busiest process (CPU time / wall time; near 100%: raise --clients),")
    print("the server's /metrics over the level (its running batch sampled, tokens per model call, its own means)")
    rows = [["streams", "clients", "client cpu", "srv running", "srv tok/call", "srv TTFT mean", "srv ITL mean"]]
    for v in levels:
        server = [fmt(v.server.get(k)) for k in ("running_mean", "tokens_per_step")]
        server += [fmt(v.server.get(k), 2) for k in ("ttft_mean_ms", "itl_mean_ms")]
        rows.append([str(v.concurrency), str(v.clients), f"{v.client_cpu:.0%}", *server])
    print_columns(rows, rule=True)
    b1, b16 = statics[0], statics[-1]
    print(f"\nratios: tokens/s over static batch-16 ({b16.tokens_per_s:.1f} tokens/s; target at 64 streams >= 1.5),")
    print(f"        ITL p99 over the static batch-1 decode step ({b1.ms_per_step:.2f} ms; target <= 3)")
    rows = [["streams", "tokens/s ratio", "ITL p99 ratio"]]
    for v in levels:
        itl = None if v.itl_p99_ms is None else v.itl_p99_ms / b1.ms_per_step
        rows.append([str(v.concurrency), fmt(v.tokens_per_s / b16.tokens_per_s, 2), fmt(itl, 2)])
    print_columns(rows, rule=True)
    for v in levels:
        if v.first_error:
            print(f"{v.concurrency} streams: {v.errors} request(s) failed; the first: {v.first_error}")


# -- the run ----------------------------------------------------------------------------------------


def device_name(provider: str) -> str:
    if provider == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name())
        except ImportError:
            pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"CPU, {os.cpu_count()} cores"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return f"{found.group(1).strip() if found else 'CPU'}, {os.cpu_count()} cores"


def vocab_of(artifact: Path) -> int:
    try:
        manifest = json.loads((artifact / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{artifact} is not an llm2trt artifact (its manifest.json: {exc})") from None
    vocab = manifest.get("model_config", {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 3:
        raise UserError(f"{artifact}: the manifest's model_config has no usable vocab_size ({vocab!r})")
    return vocab


def check_args(args: argparse.Namespace) -> None:
    for name in ("prompt_tokens", "output_tokens"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            raise UserError(f"--{name.replace('_', '-')} MIN MAX needs 1 <= MIN <= MAX, not {low} {high}")
    if any(c < 1 for c in args.concurrency):
        raise UserError("--concurrency: every level needs at least one stream")
    passed = [f"--{n.replace('_', '-')}" for n in SERVER_OPTIONS if getattr(args, n) is not None]
    if args.url and passed:
        raise UserError(f"{', '.join(passed)}: for a server this script starts, not one at --url")
    if args.clients < 1:
        raise UserError("--clients must be at least 1")
    if args.requests_per_level is not None and args.requests_per_level < 1:
        raise UserError("--requests-per-level must be at least 1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="the decoder artifact (its vocabulary and the static reference)")
    parser.add_argument("--url", help="a server already running (http://HOST:PORT); default: start one")
    parser.add_argument(
        "--static-artifact",
        type=Path,
        metavar="PATH",
        help="the static reference's artifact (default: ARTIFACT); e.g. its `optimize --kv-form gqa`, whose "
        "GPU-resident session bench_decode times (serve takes the growing cache form only)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256], metavar="N")
    parser.add_argument("--requests-per-level", type=int, metavar="N", help="default: 4 x the concurrency, at least 16")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="the server's and the reference's")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument(
        "--clients",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 1) // 4)),
        metavar="K",
        help="client processes the streams are spread over (default: a quarter of the cores, 1 to 8)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here too")
    server = parser.add_argument_group("passed on to the server it starts (default: serve's own)")
    for name in SERVER_OPTIONS:
        server.add_argument(f"--{name.replace('_', '-')}", type=int)
    return parser.parse_args(argv)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    vocab = vocab_of(args.artifact)
    device = device_name(args.provider)
    print(
        f"bench_serve: {args.artifact} on {device} ({args.provider}); prompts {args.prompt_tokens[0]}-"
        f"{args.prompt_tokens[1]} tokens, outputs {args.output_tokens[0]}-{args.output_tokens[1]}, seed {args.seed}"
    )
    if args.url:  # before the reference's minutes: is anything there?
        asyncio.run(model_id(args.url.rstrip("/").removesuffix("/v1")))
    middle = (args.prompt_tokens[0] + args.prompt_tokens[1]) // 2
    print("static reference ...", flush=True)
    reference = args.static_artifact or args.artifact
    statics = static_reference(
        reference, args.provider, middle, args.output_tokens[1], args.seed, args.prompt_tokens[1]
    )
    server = None if args.url else ServerProcess(args.artifact, server_options(args))
    try:
        url = (args.url or (server.url if server else None) or "").rstrip("/").removesuffix("/v1")
        print(f"serving at {url}", flush=True)
        levels = load_levels(url, args, vocab)
        if server is not None:
            code = server.stop(timeout=120)
            if code != 0:
                raise UserError(f"llm2trt serve exited {code} after SIGTERM: {server.tail()}")
    finally:
        if server is not None:
            server.kill()
    print_report(statics, levels)
    return {
        "device": device,
        "provider": args.provider,
        "artifact": str(args.artifact),
        "static_artifact": str(reference),
        "url": args.url,
        "settings": {k: v for k, v in vars(args).items() if k not in ("artifact", "static_artifact", "json")},
        "static": [asdict(s) for s in statics],
        "levels": [asdict(v) for v in levels],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from llm2trt.core.errors import Llm2TrtError, first_line

    args = parse_args(argv)
    try:
        result = bench(args)
    except (UserError, ServeError, Llm2TrtError) as exc:
        print(f"bench_serve: {first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_serve: interrupted", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
