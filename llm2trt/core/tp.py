"""Tensor parallelism's vocabulary: the explicit mapping (tp size, rank), how each layer kind splits,
and the one pure function that slices a weight for a rank.

Weights are as the ONNX graphs hold them: a linear layer's weight is [in, out] (MatMul's second
input), an embedding table [vocab, hidden]. No global state: every function takes the mapping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.records import Record


@dataclass(frozen=True)
class Mapping(Record):
    """Which rank of how many this graph is."""

    tp: int
    rank: int

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise InputError(f"--tp must be at least 1 (got {self.tp})")
        if not 0 <= self.rank < self.tp:
            raise InputError(f"rank {self.rank} is outside tp {self.tp} (ranks 0..{self.tp - 1})")

    @classmethod
    def ranks(cls, tp: int) -> list[Mapping]:
        return [cls(tp, r) for r in range(tp)]


class Split(enum.Enum):
    """How a layer kind's weight is divided among ranks."""

    COLUMN = "column"  # output features (q/k/v by whole heads, gate/up): no communication after
    ROW = "row"  # input features (o_proj, down): partial sums, one all-reduce, bias added after it
    VOCAB = "vocab"  # vocabulary rows of an embedding, or lm_head's columns, padded to a multiple of tp
    REPLICATE = "replicate"  # norms, RoPE tables: every rank holds all of it


@dataclass(frozen=True)
class Heads:
    """The attention shape a split by heads needs."""

    heads: int
    kv_heads: int
    head_dim: int

    def check(self, tp: int) -> None:
        """Refuse, naming the numbers, a tp the heads cannot be split over."""
        if self.heads % tp:
            raise InputError(f"--tp {tp}: {self.heads} attention heads do not divide into {tp} ranks")
        if self.kv_heads >= tp and self.kv_heads % tp:
            raise InputError(f"--tp {tp}: {self.kv_heads} KV heads do not divide into {tp} ranks")
        if self.kv_heads < tp and tp % self.kv_heads:
            raise InputError(
                f"--tp {tp}: {self.kv_heads} KV heads cannot be replicated evenly over {tp} ranks "
                f"(tp must be a multiple of {self.kv_heads})"
            )

    def q_heads(self, mapping: Mapping) -> range:
        per = self.heads // mapping.tp
        return range(mapping.rank * per, (mapping.rank + 1) * per)

    def kv_heads_of(self, mapping: Mapping) -> range:
        """The KV heads a rank's query heads read: a contiguous share, or one replicated head when
        there are fewer KV heads than ranks."""
        group = self.heads // self.kv_heads  # query heads per KV head
        q = self.q_heads(mapping)
        return range(q.start // group, (q.stop - 1) // group + 1)


def padded(size: int, tp: int) -> int:
    """`size` rounded up to a multiple of tp (a vocabulary split over ranks)."""
    return -(-size // tp) * tp


def shard(
    weight: np.ndarray, split: Split, mapping: Mapping, *, units: range | None = None, unit: int = 1
) -> np.ndarray:
    """The rank's slice of a weight.

    COLUMN slices the last axis (a column-parallel bias the same way): with `units` (e.g. the rank's
    heads) of `unit` features each (head_dim), those whole units; else an even share. ROW slices
    axis 0 of an [in, out] weight; its bias is not sliced, it is added once after the all-reduce.
    VOCAB is `shard_vocab` on axis 0 (an embedding table). REPLICATE returns the weight.
    """
    if split is Split.REPLICATE:
        return weight
    if split is Split.VOCAB:
        return shard_vocab(weight, mapping, axis=0)
    axis = weight.ndim - 1 if split is Split.COLUMN else 0
    size = weight.shape[axis]
    if units is None:
        if size % mapping.tp:
            raise InputError(f"--tp {mapping.tp}: {size} features do not divide into {mapping.tp} ranks")
        per = size // mapping.tp
        units, unit = range(mapping.rank, mapping.rank + 1), per
    if units.stop * unit > size:
        raise ValueError(f"units {units} of {unit} exceed the {size} features of axis {axis}")
    return np.take(weight, np.arange(units.start * unit, units.stop * unit), axis=axis)


def shard_vocab(weight: np.ndarray, mapping: Mapping, axis: int) -> np.ndarray:
    """The rank's share of a vocabulary axis, zero-padded to a multiple of tp first (padded rows
    embed to zero and padded logits are dropped after the gather)."""
    size = weight.shape[axis]
    total = padded(size, mapping.tp)
    if total != size:
        pad = [(0, 0)] * weight.ndim
        pad[axis] = (0, total - size)
        weight = np.pad(weight, pad)
    per = total // mapping.tp
    return np.take(weight, np.arange(mapping.rank * per, (mapping.rank + 1) * per), axis=axis)
