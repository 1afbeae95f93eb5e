"""Decoder sessions: run a decoder graph token by token for one batch, owning its KV cache.

A session turns "these prompts, then these tokens" into the graph's inputs for the graph's cache
form and hands back the logits of each row's newest token:

- growing cache (the exporter's): prompts left-padded as transformers pads them, positions
  counted over real tokens, a 2-D mask over every cached slot; the presents come back as the next
  step's past (on a backend that cannot take an empty past, one masked dummy slot starts it);
- fixed buffer: rows left-aligned (each prompt from slot 0, right-padded in the prefill), so a
  token's position is its slot; the graph writes the new entries in place;
- no cache: the whole sequence again each step (what `optimize` uses to check a cache it inserted).

The graph runs through an `Executor`: ONNX Runtime here; the TensorRT engine and ONNX Runtime's
CUDA provider with IO binding plug in the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.kv import BATCH, SEQLENS_K, SEQUENCE, TOTAL_SEQUENCE_LENGTH, KVLayout
from llm2trt.core.log import plural
from llm2trt.core.lora import NO_ADAPTER, AdapterBatch, LoraAdapter
from llm2trt.core.manifest import GraphSpec, Manifest

Feeds = dict[str, np.ndarray]
Executor = Callable[[Feeds], dict[str, np.ndarray]]


@dataclass
class _State:
    """What a session carries between steps."""

    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # next position per row
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    cache: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: list[list[int]] = field(default_factory=list)
    logits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # the last step's, whole


_USUAL = ("input_ids", "attention_mask", "position_ids")


class DecoderSession(abc.ABC):
    """One batch on one graph: `prefill` the prompts, then `decode` one token per row at a time."""

    def __init__(self, graph: GraphSpec, run: Executor, pad_id: int = 0, adapters: AdapterBatch | None = None) -> None:
        self.graph, self.pad_id = graph, pad_id
        run = with_adapters(graph, run, adapters)
        # Sessions feed what the family's graphs take; a graph without some input (BLOOM's ALiBi
        # reads positions from the mask: no position_ids) is fed only what it declares.
        names = {t.name for t in graph.inputs}
        self.run: Executor = (
            run
            if all(n in names for n in _USUAL)
            else lambda feeds: run({k: v for k, v in feeds.items() if k in names})
        )
        # fp16 graphs may give float32 logits (passes/ort_ops.py); the cache keeps the graph's type.
        self.logits_dtype = next(t.dtype for t in graph.outputs if t.name == graph.main_output)
        kv = graph.kv_cache
        self.cache_dtype = graph.input(kv.past_names[0]).dtype if kv is not None else self.logits_dtype
        self.state = _State()

    @abc.abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (batch, vocab) of each prompt's last token."""

    @abc.abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (batch,); logits (batch, vocab) of it."""

    def greedy_pipeline(self, logits: np.ndarray) -> Iterator[list[int]] | None:
        """Greedy ids step after step without the logits crossing to the host, for sessions that
        can (None: pick from `decode`'s logits). `logits` are the prefill's."""
        return None

    def _logits(self, out: dict[str, np.ndarray]) -> np.ndarray:
        logits: np.ndarray = np.asarray(out[self.graph.main_output])
        self.state.logits = logits
        return logits

    def prompt_logits(self, prompt: Sequence[int]) -> np.ndarray:
        """Logits (len(prompt), vocab) at every position of one prompt, from a fresh prefill."""
        self.prefill([prompt])
        return self.state.logits[0, -len(prompt) :]

    def _keep_cache(self, kv: KVLayout, out: dict[str, np.ndarray]) -> None:
        """This step's presents become the next step's past."""
        self.state.cache = {p: out[q] for p, q in zip(kv.past_names, kv.present_names, strict=True)}

    def _empty_cache(self, kv: KVLayout, batch: int, length: int) -> dict[str, np.ndarray]:
        shape = (batch, kv.num_kv_heads, length, kv.head_dim)
        return {name: np.zeros(shape, dtype=self.cache_dtype.numpy) for name in kv.past_names}


def adapter_feeds(graph: GraphSpec, adapters: Sequence[LoraAdapter]) -> dict[str, np.ndarray]:
    """The graph's LoRA weight inputs with `adapters` packed into its slots, in the graph's types
    (no slots: nothing, and adapters are refused)."""
    lora = graph.lora
    if lora is None:
        if adapters:
            raise InputError(
                "this artifact has no LoRA slots: optimize it with --lora-slots N, "
                "or merge the adapter at convert (--lora)"
            )
        return {}
    return {name: value.astype(graph.input(name).dtype.numpy) for name, value in lora.pack(adapters).items()}


def with_adapters(graph: GraphSpec, run: Executor, adapters: AdapterBatch | None) -> Executor:
    """`run` fed the graph's LoRA inputs: the adapters in their slots and each row's slot (a graph
    with slots and no adapters: every row the base model). Packed once; a step adds the slot feed."""
    weights = adapter_feeds(graph, adapters.adapters if adapters is not None else ())
    lora = graph.lora
    if lora is None:
        return run
    rows = list(adapters.rows) if adapters is not None else []

    def run_with_adapters(feeds: Feeds) -> dict[str, np.ndarray]:
        batch = int(feeds["input_ids"].shape[0] if "input_ids" in feeds else next(iter(feeds.values())).shape[0])
        if rows and len(rows) != batch:
            raise InputError(f"{plural(len(rows), 'adapter row')} for a batch of {batch}")
        slots = np.asarray(rows or [NO_ADAPTER] * batch, dtype=np.int64)
        return run({**feeds, **weights, lora.slot_input: slots})

    return run_with_adapters


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the 2-D mask of prompts padded on the left, as transformers batches them."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    """transformers' positions for a left-padded batch: counted over real tokens, pads at 0."""
    positions: np.ndarray = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return positions


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")


class NoCacheSession(DecoderSession):
    """Recomputes the whole (left-padded) sequence each step: slow, but a cache-free reference."""

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        _check_prompts(prompts)
        self.state.tokens = [list(p) for p in prompts]
        return self._step()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        for row, token in zip(self.state.tokens, tokens.tolist(), strict=True):
            row.append(int(token))
        return self._step()

    def _step(self) -> np.ndarray:
        ids, mask = left_padded(self.state.tokens, self.pad_id)
        out = self.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions_of(mask)})
        return self._logits(out)[:, -1]


class GrowingSession(DecoderSession):
    """A growing cache: left padding, presents fed back as the next past."""

    def __init__(
        self,
        graph: GraphSpec,
        run: Executor,
        pad_id: int = 0,
        dummy_slot: bool = False,
        adapters: AdapterBatch | None = None,
    ) -> None:
        super().__init__(graph, run, pad_id, adapters)
        self.kv: KVLayout = kv_layout(graph)
        # Backends whose profiles have no zero-length past (TensorRT) start from one masked slot.
        self.dummy_slot = dummy_slot

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        _check_prompts(prompts)
        ids, mask = left_padded(prompts, self.pad_id)
        past = 1 if self.dummy_slot else 0
        batch = ids.shape[0]
        cache = self._empty_cache(self.kv, batch, past)
        full_mask = np.concatenate([np.zeros((batch, past), dtype=np.int64), mask], axis=1)
        return self._run(ids, full_mask, positions_of(mask), cache)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        batch = tokens.shape[0]
        mask = np.concatenate([self.state.mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = self.state.positions[:, None]
        return self._run(tokens.reshape(batch, 1).astype(np.int64), mask, positions, self.state.cache)

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: dict[str, np.ndarray]
    ) -> np.ndarray:
        out = self.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions, **cache})
        self._keep_cache(self.kv, out)
        self.state.mask = mask
        self.state.positions = positions[:, -1] + 1
        return self._logits(out)[:, -1]


class FixedSession(DecoderSession):
    """A fixed buffer of `capacity` slots: rows left-aligned, positions are slots."""

    def __init__(
        self, graph: GraphSpec, run: Executor, capacity: int, pad_id: int = 0, adapters: AdapterBatch | None = None
    ) -> None:
        super().__init__(graph, run, pad_id, adapters)
        self.kv = kv_layout(graph)
        self.capacity = capacity

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        _check_prompts(prompts)
        width = max(len(p) for p in prompts)
        if width > self.capacity:
            raise InputError(f"a prompt of {plural(width, 'token')} does not fit the {self.capacity}-slot KV cache")
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        self.state.cache = self._empty_cache(self.kv, len(prompts), self.capacity)
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        out = self._run(ids, positions, lengths)
        self.state.positions = lengths
        return out[np.arange(len(prompts)), lengths - 1]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if int(self.state.positions.max()) >= self.capacity:
            raise InputError(f"the {self.capacity}-slot KV cache is full")
        batch = tokens.shape[0]
        positions = self.state.positions
        out = self._run(tokens.reshape(batch, 1).astype(np.int64), positions[:, None].copy(), positions + 1)
        self.state.positions = positions + 1
        return out[:, -1]

    def _run(self, ids: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One step; `lengths`: each row's valid slots after it."""
        out = self.run({"input_ids": ids, "position_ids": positions, **self._counters(lengths), **self.state.cache})
        self._keep_cache(self.kv, out)
        return self._logits(out)

    def _counters(self, lengths: np.ndarray) -> Feeds:
        return {}


class GqaSession(FixedSession):
    """ONNX Runtime's GroupQueryAttention graph: a fixed buffer counted by each row's length
    (right padding in a prefill is masked by the lengths, as GroupQueryAttention reads them)."""

    def _counters(self, lengths: np.ndarray) -> Feeds:
        seqlens = (lengths - 1).astype(np.int32)
        return {SEQLENS_K: seqlens, TOTAL_SEQUENCE_LENGTH: np.asarray(int(lengths.max()), dtype=np.int32)}


def decoder_graph(manifest: Manifest, command: str = "generate") -> GraphSpec:
    if manifest.task != "text-generation":
        raise InputError(f"{command} needs a decoder artifact; this one is {manifest.architecture} ({manifest.task})")
    graph = next((g for g in manifest.graphs.values() if g.kv_cache is not None), None)
    if graph is None:
        raise InputError(
            "this artifact has no KV cache (converted with --no-kv-cache?): convert again, or add one with "
            "`llm2trt optimize IN -o OUT --kv-cache`"
        )
    return graph


def check_ids(manifest: Manifest, prompts: list[list[int]]) -> None:
    """Refuse token ids the embedding has no row for: ONNX Runtime would fail deep in a Gather
    (an internal error), and a negative id would quietly index from the end."""
    vocab = manifest.model_config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    bad = sorted({i for prompt in prompts for i in prompt if not 0 <= i < vocab})
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise InputError(f"token ids outside this model's vocabulary of {vocab} (0 to {vocab - 1}): {shown}")


def position_limit(graph: GraphSpec, manifest: Manifest) -> int | None:
    """The most positions (prompt + new tokens) a sequence may hold: the graph's profiles' cache
    dims and the model's own position table; None where neither says."""
    limits = [r.max for d, r in graph.dims.items() if d not in (BATCH, SEQUENCE)]
    positions = manifest.model_config.get("max_position_embeddings") or manifest.model_config.get("n_positions")
    if positions:
        limits.append(int(positions))
    return min(limits) if limits else None


def kv_layout(graph: GraphSpec) -> KVLayout:
    """The graph's KV cache, refused where it has none."""
    if graph.kv_cache is None:
        raise InputError(f"graph {graph.name!r} has no KV cache")
    return graph.kv_cache


def open_session(
    graph: GraphSpec,
    run: Executor,
    *,
    capacity: int,
    pad_id: int = 0,
    dummy_slot: bool = False,
    adapters: AdapterBatch | None = None,
) -> DecoderSession:
    """The session for the graph's cache form; `capacity` bounds prompt + new tokens; `adapters`
    fill a LoRA graph's slots, per row."""
    if graph.kv_cache is None:
        return NoCacheSession(graph, run, pad_id, adapters)
    traits = graph.kv_cache.traits
    if not traits.buffer:
        return GrowingSession(graph, run, pad_id, dummy_slot, adapters)
    return (GqaSession if traits.counters else FixedSession)(graph, run, capacity, pad_id, adapters)
