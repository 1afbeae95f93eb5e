"""A decoder graph run over the paged KV cache: one call steps any set of sequences, each with its
own cached length and its own new tokens.

The graph is the exporter's growing form (past in, past + new out). A step gathers the rows' blocks
left-padded to the longest past, feeds the new tokens left-padded too, and masks every pad, as
transformers batches sequences of different lengths; positions count each row's real tokens. The
new entries of each row go back into its blocks. The scheduler never mixes a padded past with
padded new tokens in one call: a step is either a decode (one new token a row), a batch of fresh
prompts (no past), or one prompt's chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2trt.backends.decoder import Executor, adapter_feeds, decoder_graph, kv_layout, position_limit
from llm2trt.core.errors import InputError
from llm2trt.core.lora import NO_ADAPTER, LoraAdapter
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.serve.blocks import BlockPool, BlockTable


@dataclass(frozen=True)
class Row:
    """One sequence in a step: its block table, the tokens fed after what it has cached, and its
    LoRA slot (NO_ADAPTER: the base model)."""

    table: BlockTable
    tokens: Sequence[int]
    slot: int = NO_ADAPTER


class PagedModel:
    """A decoder graph and the block pool its cache lives in."""

    def __init__(
        self,
        graph: GraphSpec,
        run: Executor,
        pool: BlockPool,
        pad_id: int = 0,
        adapters: Sequence[LoraAdapter] = (),
    ) -> None:
        kv = kv_layout(graph)
        if kv.traits.buffer:
            raise InputError(
                f"serve runs the growing KV-cache form (convert's); this artifact has the {kv.form} cache form: "
                "serve the artifact it was optimized from, or optimize without --kv-form"
            )
        # The adapters' weights, packed into the slots once; a step adds only each row's slot.
        self.lora_feeds = adapter_feeds(graph, adapters)
        self.slot_input = graph.lora.slot_input if graph.lora is not None else None
        self.graph, self.kv, self.pool, self.pad_id = graph, kv, pool, pad_id
        self.names = {t.name for t in graph.inputs}
        self._run = run

    def step(self, rows: Sequence[Row], every_position: bool = False) -> np.ndarray:
        """Feed each row its tokens; logits `(rows, vocab)` of each row's last one (`every_position`:
        `(rows, longest new, vocab)`, a row's own positions last). Every row's new entries are in its
        blocks afterwards."""
        pasts = np.array([r.table.length for r in rows], dtype=np.int64)
        news = np.array([len(r.tokens) for r in rows], dtype=np.int64)
        longest_past, longest_new = int(pasts.max()), int(news.max())
        ids = np.full((len(rows), longest_new), self.pad_id, dtype=np.int64)
        new_mask = np.zeros((len(rows), longest_new), dtype=np.int64)
        past_mask = np.zeros((len(rows), longest_past), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, longest_new - news[i] :] = row.tokens
            new_mask[i, longest_new - news[i] :] = 1
            past_mask[i, longest_past - pasts[i] :] = 1
        positions = pasts[:, None] + np.clip(np.cumsum(new_mask, axis=1) - 1, 0, None)
        past = self.pool.gather([r.table for r in rows])
        feeds = {
            "input_ids": ids,
            "attention_mask": np.concatenate([past_mask, new_mask], axis=1),
            "position_ids": positions.astype(np.int64),
            **{name: past[i] for i, name in enumerate(self.kv.past_names)},
            **self.lora_feeds,
        }
        if self.slot_input is not None:
            feeds[self.slot_input] = np.array([r.slot for r in rows], dtype=np.int64)
        out = self._run({k: v for k, v in feeds.items() if k in self.names})
        # The new entries are the last `longest_new` of every present (a row's own are its last
        # `news[i]`): taken from every tensor at once, then written row by row into the blocks.
        total = longest_past + longest_new
        tail = np.stack([out[name][:, :, total - longest_new :] for name in self.kv.present_names])
        for i, row in enumerate(rows):
            self.pool.scatter(row.table, tail[:, i, :, longest_new - int(news[i]) :])
        logits: np.ndarray = np.asarray(out[self.graph.main_output])
        return logits if every_position else logits[:, -1]


@dataclass(frozen=True)
class Loaded:
    """What the server needs of an artifact: the model on its pool, the limits, the tokenizer."""

    model: PagedModel
    manifest: Manifest
    name: str
    max_positions: int
    eos: tuple[int, ...]
    tokenizer: Any  # transformers' tokenizer, or None (tiny models)
    adapters: dict[str, int] = field(default_factory=dict)  # an adapter's name in the API -> its slot


def load(
    artifact: Path,
    *,
    providers: list[str],
    kv_bytes: int,
    block_size: int,
    name: str | None = None,
    adapters: Sequence[str] = (),
) -> Loaded:
    """Open a decoder artifact for serving: its graph in ONNX Runtime and a KV pool of `kv_bytes`;
    `adapters` (`NAME=DIR`) fill its LoRA slots, each served as a model of that name."""
    from llm2trt.backends.onnxruntime.decoder import ort_executor
    from llm2trt.convert.tokenizer import load_tokenizer

    manifest = Manifest.read(artifact)
    graph = decoder_graph(manifest, "serve")
    if graph.engine is not None:
        raise InputError("serve runs ONNX graphs through ONNX Runtime: give the artifact, not an engine directory")
    if manifest.tensor_parallel is not None or manifest.pipeline_parallel is not None:
        raise InputError("serve runs one process: give the unsplit artifact (a --tp/--pp split is not served yet)")
    kv = kv_layout(graph)
    if kv.dtype is not None:
        raise InputError(f"serve keeps the cache in the model's type; this artifact's cache is {kv.dtype}")
    dtype = graph.input(kv.past_names[0]).dtype.numpy
    tensors = len(kv.past_names)
    blocks = BlockPool.blocks_for(tensors, kv.num_kv_heads, kv.head_dim, block_size, np.dtype(dtype).itemsize, kv_bytes)
    if blocks < 1:
        raise InputError(f"--kv-cache-mb is too small for one block of {block_size} positions of this model")
    pool = BlockPool(tensors, kv.num_kv_heads, kv.head_dim, block_size, blocks, np.dtype(dtype))
    generation = manifest.generation
    pad = int(generation.pad_token_id) if generation and generation.pad_token_id is not None else 0
    model_name = name or artifact.resolve().name
    loaded = _adapters(adapters, model_name)
    run = ort_executor(str(manifest.onnx_path(artifact, graph.name)), providers)
    model = PagedModel(graph, run, pool, pad, [a for _, a in loaded])
    limit = position_limit(graph, manifest) or blocks * block_size
    return Loaded(
        model=model,
        manifest=manifest,
        name=model_name,
        max_positions=min(limit, blocks * block_size),
        eos=tuple(generation.eos_token_ids) if generation else (),
        tokenizer=load_tokenizer(artifact, manifest),
        adapters={adapter_name: slot for slot, (adapter_name, _) in enumerate(loaded)},
    )


def _adapters(values: Sequence[str], model_name: str) -> list[tuple[str, LoraAdapter]]:
    """`--adapter NAME=DIR` values read, each under a name no other model of the server has."""
    from llm2trt.core.lora import parse_adapter_arg, read_adapter

    out: list[tuple[str, LoraAdapter]] = []
    for value in values:
        adapter_name, path = parse_adapter_arg(value)
        adapter = read_adapter(path, adapter_name)
        if adapter.name == model_name or any(adapter.name == seen for seen, _ in out):
            raise InputError(f"--adapter: the name {adapter.name!r} is taken; give each adapter its own NAME=")
        out.append((adapter.name, adapter))
    return out
