"""generate: text from a decoder artifact, token by token through its KV cache.

Runners: `ort` (ONNX Runtime; CPU, or CUDA where onnxruntime-gpu is installed), `torch` (the
transformers model the artifact came from: the reference), `trt` (the engine of an engine
directory; needs full TensorRT or a GPU TensorRT-RTX runs on). Greedy by default; temperature,
top-k and top-p sampling with a seed. A batch of prompts of different lengths is padded the way
the graph's cache form needs (session.py). Generation stops at an EOS token or after
`max_new_tokens`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.backends.base import DecoderContext
from llm2trt.backends.decoder import DecoderSession, check_ids, decoder_graph, position_limit
from llm2trt.backends.registry import BACKENDS, open_decoder
from llm2trt.convert.tokenizer import encode_prompts, load_tokenizer
from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.kv import SEQUENCE
from llm2trt.core.log import plural
from llm2trt.core.lora import AdapterBatch, LoraAdapter
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.records import Record
from llm2trt.core.sampling import Sampling

if TYPE_CHECKING:
    from llm2trt.backends.onnxruntime.ranks import RankContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedRow(Record):
    ids: list[int]  # prompt ids + new ids, ending at the first EOS (included)
    new_ids: list[int]
    text: str | None  # the new tokens decoded, when the artifact has a tokenizer
    stop: str  # eos | length


@dataclass(frozen=True)
class Generated(Record):
    runner: str
    rows: list[GeneratedRow]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    def to_dict(self) -> dict[str, Any]:
        first = self.rows[0]
        return {"text": first.text, "ids": first.ids, "results": [r.to_dict() for r in self.rows], **self._timing()}

    def _timing(self) -> dict[str, Any]:
        per_step = self.decode_seconds / self.decode_steps * 1e3 if self.decode_steps else None
        return {"runner": self.runner, "prefill_ms": self.prefill_seconds * 1e3, "decode_ms_per_step": per_step}

    def render(self) -> str:
        texts = [r.text if r.text is not None else " ".join(map(str, r.new_ids)) for r in self.rows]
        return "\n".join(texts) if len(texts) == 1 else "\n".join(f"[{i}] {t}" for i, t in enumerate(texts))


@dataclass
class _Rows:
    """Per-row progress of a batch."""

    eos: set[int]
    new: list[list[int]]
    done: list[bool]

    @classmethod
    def start(cls, rows: int, eos: Sequence[int]) -> _Rows:
        return cls(set(eos), [[] for _ in range(rows)], [False] * rows)

    def take(self, tokens: np.ndarray) -> None:
        for row, token in enumerate(tokens.tolist()):
            if not self.done[row]:
                self.new[row].append(int(token))
                self.done[row] = int(token) in self.eos


def generate_ids(
    session: DecoderSession,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    eos_ids: Sequence[int],
    on_tokens: Callable[[np.ndarray], None] | None = None,
    refill_at: int | None = None,
) -> tuple[list[list[int]], list[str], tuple[float, float, int]]:
    """New ids per row, why each stopped, and (prefill s, decode s, decode steps).

    `refill_at`: the length (padded prompt width + tokens fed) at which the model's own generate
    drops its cache and runs the whole sequence again (`cache_refill_length` of the exporter spec:
    Phi-3's LongRoPE switches every position to the long factors there); None: never.
    """
    pick, rows = sampling.picker(), _Rows.start(len(prompts), eos_ids)
    start = time.perf_counter()
    logits = session.prefill(prompts)
    tokens = pick(logits)
    prefill = time.perf_counter() - start
    rows.take(tokens)
    steps, start = 0, time.perf_counter()
    width = max(len(p) for p in prompts)
    fed: list[np.ndarray] = []  # the tokens fed after the prompts, kept only for a refill to come
    refill = refill_at if refill_at is not None and width < refill_at else None
    # Greedy on a session that picks on the GPU: its ids, step after step; else logits to the host
    # (until a refill is behind: the pipeline runs a step ahead).
    greedy = sampling.temperature == 0
    pipeline = session.greedy_pipeline(logits) if greedy and refill is None else None
    while not all(rows.done) and steps + 1 < sampling.max_new_tokens:
        if on_tokens:
            on_tokens(tokens)
        if refill is not None:
            fed.append(tokens)
        if refill is not None and width + len(fed) == refill:
            logits = session.prefill([[*p, *(int(t[row]) for t in fed)] for row, p in enumerate(prompts)])
            tokens, refill, fed = pick(logits), None, []
            pipeline = session.greedy_pipeline(logits) if greedy else None
        else:
            tokens = np.asarray(next(pipeline)) if pipeline is not None else pick(session.decode(tokens))
        rows.take(tokens)
        steps += 1
    if on_tokens:
        on_tokens(tokens)
    stops = ["eos" if done else "length" for done in rows.done]
    return rows.new, stops, (prefill, time.perf_counter() - start, steps)


# -- the stage ---------------------------------------------------------------------------------


def _capacity(graph: GraphSpec, manifest: Manifest, prompts: list[list[int]], sampling: Sampling) -> int:
    """prompt + new tokens, refused when it exceeds what the graph (its profiles) or the model allows."""
    longest = max(len(p) for p in prompts)
    need = longest + sampling.max_new_tokens
    limit = position_limit(graph, manifest) or need
    if SEQUENCE in graph.dims and longest > graph.dims[SEQUENCE].max:
        raise InputError(
            f"a prompt of {plural(longest, 'token')} is longer than this artifact allows ({graph.dims[SEQUENCE].max})"
        )
    if need > limit:
        raise InputError(
            f"a prompt of {plural(longest, 'token')} plus {plural(sampling.max_new_tokens, 'new one')} needs "
            f"{need} positions; this artifact holds {limit}"
        )
    return need


def _refill_at(graph: GraphSpec, manifest: Manifest, prompts: list[list[int]], sampling: Sampling) -> int | None:
    """Where this generation runs the whole sequence again, as the model's own generate does (None:
    nowhere); refused when that prefill is longer than the graph takes."""
    from llm2trt.exporters import EXPORTERS

    spec = EXPORTERS.get(manifest.architecture) if manifest.architecture in EXPORTERS else None
    at = spec.cache_refill_length(manifest.model_config) if spec is not None else None
    longest = max(len(p) for p in prompts)
    if at is None or not longest < at < longest + sampling.max_new_tokens:
        return None
    if SEQUENCE in graph.dims and at > graph.dims[SEQUENCE].max:
        raise InputError(
            f"{manifest.architecture} runs the whole sequence again at {at} tokens (its rotary scaling "
            f"changes there), longer than this artifact's prefill allows ({graph.dims[SEQUENCE].max})"
        )
    return at


def generate(
    artifact: Path,
    *,
    prompts: Sequence[str] = (),
    ids: Sequence[Sequence[int]] = (),
    sampling: Sampling | None = None,
    runner: str | None = None,
    providers: list[str] | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
    adapters: Sequence[str] = (),
) -> Generated:
    """Generate from `artifact`; `runner` None: the engine of an engine directory, else ONNX Runtime.
    `adapters`: LoRA adapters for a graph with slots, one for every row or one per row
    (`[NAME=]DIR`, a NAME given before, or `none`)."""
    sampling = sampling or Sampling()
    manifest = Manifest.read(artifact)
    graph = decoder_graph(manifest)
    runner = _runner_for(artifact, graph, runner)
    if bool(prompts) == bool(ids):
        raise InputError("give prompts as text (--prompt) or as token ids (--ids), not both, and at least one")
    tokenizer = load_tokenizer(artifact, manifest) if prompts or chat else _maybe_tokenizer(artifact, manifest)
    batch = encode_prompts(tokenizer, prompts, chat) if prompts else [list(map(int, p)) for p in ids]
    check_ids(manifest, batch)
    lora = adapter_batch(adapters, len(batch)) if adapters else None
    capacity = _capacity(graph, manifest, batch, sampling)
    ctx = DecoderContext(artifact, manifest, graph, capacity, providers or [], lora)
    eos = manifest.generation.eos_token_ids if manifest.generation else []
    refill = _refill_at(graph, manifest, batch, sampling)
    split = _split(manifest)
    if split is not None:
        new, stops, (prefill, decode, steps) = _generate_ranks(ctx, runner, batch, sampling, eos, refill)
        runner = f"{runner} {split}"
    else:
        session = _open(runner, ctx)
        echo = _streamer(tokenizer, stream) if stream and len(batch) == 1 else None
        new, stops, (prefill, decode, steps) = generate_ids(session, batch, sampling, eos, echo, refill)
    rows = [
        GeneratedRow(prompt + n, n, tokenizer.decode(n, skip_special_tokens=True) if tokenizer else None, stop)
        for prompt, n, stop in zip(batch, new, stops, strict=True)
    ]
    return Generated(runner, rows, prefill, decode, steps)


def adapter_batch(values: Sequence[str], rows: int) -> AdapterBatch:
    """`--adapter` values, one for every row or one per row, read into the batch's slots."""
    from llm2trt.core.lora import parse_adapter_arg, read_adapter

    if len(values) not in (1, rows):
        raise InputError(f"--adapter: give one for every prompt or one per prompt ({rows}), not {len(values)}")
    named: dict[str, LoraAdapter] = {}
    choices: list[LoraAdapter | None] = []
    for value in values:
        if value.lower() in ("none", "-"):
            choices.append(None)
            continue
        name, path = parse_adapter_arg(value)
        if name is None and value in named:
            choices.append(named[value])
            continue
        adapter = read_adapter(path, name)
        if adapter.name in named and named[adapter.name].record.sha256 != adapter.record.sha256:
            raise InputError(f"--adapter: two different adapters are named {adapter.name}")
        named[adapter.name] = adapter
        choices.append(adapter)
    return AdapterBatch.per_row(choices * rows if len(choices) == 1 else choices)


def _split(manifest: Manifest) -> str | None:
    """How a split artifact's processes are named in the runner (tp2, pp2); None: not split."""
    if manifest.tensor_parallel is not None:
        return f"tp{manifest.tensor_parallel.tp}"
    if manifest.pipeline_parallel is not None:
        return f"pp{manifest.pipeline_parallel.pp}"
    return None


def _runner_for(artifact: Path, graph: GraphSpec, runner: str | None) -> str:
    """An engine directory runs its engine unless another runner is asked for, and then says so: the
    tokens are not the engine's."""
    if runner is not None and runner not in BACKENDS:
        decoders = ", ".join(b.name for b in BACKENDS.entries() if b.decoder)
        raise InputError(f"unknown generate runner {runner!r}; choose one of {decoders}")
    if graph.engine is None:
        return runner or "ort"
    if runner is None:
        return "trt"
    if runner != "trt":
        what = _INSTEAD.get(runner, "something else")
        logger.warning("the engine %s is not used: --runner %s runs %s", artifact / graph.engine, runner, what)
    return runner


# What a runner other than the engine's runs, on an engine directory.
_INSTEAD = {"ort": "the ONNX graph it was built from", "torch": "the transformers model it came from"}


def _open(runner: str, ctx: DecoderContext) -> DecoderSession:
    try:
        return open_decoder(runner, ctx)
    except BackendError as exc:
        if runner != "trt" or ctx.graph.engine is None:
            raise
        raise BackendError(f"{exc}; --runner ort runs the ONNX graph the engine was built from") from None


def _rank_task(
    rank: RankContext,
    prompts: list[list[int]],
    sampling: Sampling,
    eos: list[int],
    capacity: int,
    pad_id: int,
    refill: int | None = None,
    adapters: AdapterBatch | None = None,
) -> tuple[list[list[int]], list[str], tuple[float, float, int]]:
    """Every rank decodes its own graph and cache; the gathered logits make every rank pick alike
    (a pipeline stage its own layers' graph and cache; the last stage's logits, broadcast, likewise)."""
    session = rank.session(decoder_graph(rank.manifest), capacity, pad_id, adapters)
    return generate_ids(session, prompts, sampling, eos, refill_at=refill)


def _generate_ranks(
    ctx: DecoderContext,
    runner: str,
    prompts: list[list[int]],
    sampling: Sampling,
    eos: list[int],
    refill: int | None = None,
) -> tuple[list[list[int]], list[str], tuple[float, float, int]]:
    """A tensor- or pipeline-parallel artifact: one process per rank or stage
    (llm2trt.backends.onnxruntime.ranks), ONNX Runtime in each."""
    import functools

    ranks = BACKENDS.get(runner).ranks
    if ranks is None:
        if ctx.manifest.pipeline_parallel is not None:
            raise InputError(
                f"--runner {runner}: a pipeline-parallel artifact runs on the rank harness (--runner ort), "
                "one process per stage; running its stage engines is not built yet"
            )
        raise InputError(
            f"--runner {runner}: a tensor-parallel artifact runs on the rank harness (--runner ort); "
            "its engines need NCCL TensorRT plugins at run time, which this build does not load"
        )
    task = functools.partial(
        _rank_task,
        prompts=prompts,
        sampling=sampling,
        eos=list(eos),
        capacity=ctx.capacity,
        pad_id=ctx.pad_id,
        refill=refill,
        adapters=ctx.adapters,
    )
    result: tuple[list[list[int]], list[str], tuple[float, float, int]] = ranks(ctx.artifact, task, ctx.providers)
    return result


def _maybe_tokenizer(artifact: Path, manifest: Manifest) -> Any:
    try:
        return load_tokenizer(artifact, manifest)
    except (OSError, ValueError) as exc:
        logger.warning("cannot load the tokenizer: %s", exc)
        return None


def _streamer(tokenizer: Any, write: Callable[[str], None]) -> Callable[[np.ndarray], None]:
    """Print each new token of a single prompt as it comes (decoded in context, so spaces are right)."""
    seen: list[int] = []
    shown = [""]

    def on_tokens(tokens: np.ndarray) -> None:
        seen.append(int(tokens[0]))
        text = tokenizer.decode(seen, skip_special_tokens=True) if tokenizer else " ".join(map(str, seen))
        write(text[len(shown[0]) :])
        shown[0] = text

    return on_tokens
