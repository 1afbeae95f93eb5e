"""Tensor parallelism's vocabulary: the explicit mapping (tp size, rank), how each layer kind splits,
and the one pure function that slices a weight for a rank.

Weights are as the ONNX graphs hold them: a linear layer's weight is [in, out] (MatMul's second
input), an embedding table [vocab, hidden]. No global state: every function takes the mapping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural
from llm2trt.core.records import Record


@dataclass(frozen=True)
class Mapping(Record):
    """Which rank of how many this graph is. Attention and dense layers split over all `tp` ranks;
    a mixture of experts' experts over `ep` groups of ranks (a contiguous block of experts each),
    and within a group each expert's intermediate features over its tp / ep ranks (`moe_tp`)."""

    tp: int
    rank: int
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise InputError(f"--tp must be at least 1 (got {self.tp})")
        if self.ep < 1 or self.tp % self.ep:
            raise InputError(f"--ep {self.ep} must divide the {self.tp} ranks (--tp)")
        if not 0 <= self.rank < self.tp:
            raise InputError(f"rank {self.rank} is outside tp {self.tp} (ranks 0..{self.tp - 1})")

    @classmethod
    def ranks(cls, tp: int, ep: int = 1) -> list[Mapping]:
        return [cls(tp, r, ep) for r in range(tp)]

    @property
    def moe_tp(self) -> int:
        """Ranks sharing one block of experts (each holds a share of every expert's features)."""
        return self.tp // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp


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
            raise InputError(f"--tp {tp}: {plural(self.heads, 'attention head')} do not divide into {tp} ranks")
        if self.kv_heads >= tp and self.kv_heads % tp:
            raise InputError(f"--tp {tp}: {plural(self.kv_heads, 'KV head')} do not divide into {tp} ranks")
        if self.kv_heads < tp and tp % self.kv_heads:
            raise InputError(
                f"--tp {tp}: {plural(self.kv_heads, 'KV head')} cannot be replicated evenly over {tp} ranks "
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


class Units(enum.Enum):
    """How a split layer's features are grouped, so a rank takes whole groups."""

    EVEN = "even"  # an even share (gate/up/down, c_fc)
    Q = "q"  # query heads of head_dim (q_proj's outputs, o_proj's inputs)
    KV = "kv"  # KV heads (k_proj, v_proj), replicated when there are fewer than ranks
    QKV = "qkv"  # query, key and value heads side by side (GPT-2's c_attn, Phi-3's qkv_proj)
    QKV_BY_HEAD = "qkv-by-head"  # each head's query, key and value together (BLOOM's query_key_value)
    HALVES = "halves"  # two parts side by side, each split evenly (Phi-3's gate_up_proj)


def feature_index(units: Units, heads: Heads, mapping: Mapping, size: int) -> np.ndarray:
    """The features of a `size`-feature axis that belong to the rank, in order."""
    hd = heads.head_dim

    def span(r: range, offset: int = 0) -> np.ndarray:
        return np.arange(offset + r.start * hd, offset + r.stop * hd)

    q, kv = heads.q_heads(mapping), heads.kv_heads_of(mapping)
    want = {
        Units.Q: heads.heads * hd,
        Units.KV: heads.kv_heads * hd,
        Units.QKV: (heads.heads + 2 * heads.kv_heads) * hd,
        Units.QKV_BY_HEAD: 3 * heads.heads * hd,
    }.get(units)
    if want is not None and want != size:
        raise InputError(f"--tp {mapping.tp}: {size} features are not the {want} of {units.value} heads")
    if units is Units.Q:
        return span(q)
    if units is Units.KV:
        return span(kv)
    if units is Units.QKV:
        k0 = heads.heads * hd
        return np.concatenate([span(q), span(kv, k0), span(kv, k0 + heads.kv_heads * hd)])
    if units is Units.QKV_BY_HEAD:  # head h owns features [3h, 3h + 3) * head_dim
        return np.arange(q.start * 3 * hd, q.stop * 3 * hd)
    if units is Units.HALVES:
        if size % 2:
            raise InputError(f"--tp {mapping.tp}: {size} features do not split into two equal parts")
        half = even_index(size // 2, mapping)
        return np.concatenate([half, half + size // 2])
    return even_index(size, mapping)


def even_index(size: int, mapping: Mapping) -> np.ndarray:
    """The rank's even share of `size` features."""
    if size % mapping.tp:
        raise InputError(f"--tp {mapping.tp}: {size} features do not divide into {mapping.tp} ranks")
    per = size // mapping.tp
    return np.arange(mapping.rank * per, (mapping.rank + 1) * per)


def shard(weight: np.ndarray, split: Split, mapping: Mapping, index: np.ndarray | None = None) -> np.ndarray:
    """The rank's slice of a weight.

    COLUMN slices the last axis (a column-parallel bias the same way), ROW axis 0 of an [in, out]
    weight (its bias is not sliced: it is added once, after the all-reduce); both take `index`
    (`feature_index`: whole heads) or an even share. VOCAB is `shard_vocab` on axis 0 (an
    embedding table). REPLICATE returns the weight.
    """
    if split is Split.REPLICATE:
        return weight
    if split is Split.VOCAB:
        return shard_vocab(weight, mapping, axis=0)
    axis = weight.ndim - 1 if split is Split.COLUMN else 0
    if index is None:
        index = even_index(weight.shape[axis], mapping)
    return np.take(weight, index, axis=axis)


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


def check_experts(experts: int, intermediate: int, mapping: Mapping) -> None:
    """Refuse, naming the numbers, experts or features that do not divide over the mapping."""
    if experts % mapping.ep:
        raise InputError(f"--ep {mapping.ep}: {plural(experts, 'expert')} do not divide into {mapping.ep} groups")
    if intermediate % mapping.moe_tp:
        raise InputError(
            f"--tp {mapping.tp} --ep {mapping.ep}: each expert's {intermediate} intermediate features do not "
            f"divide into the {mapping.moe_tp} ranks sharing its group"
        )


def shard_experts(gate_up: np.ndarray, down: np.ndarray, mapping: Mapping) -> tuple[np.ndarray, np.ndarray, int]:
    """The rank's experts: its group's block of experts ([E, 2I, H] gate then up rows, [E, H, I]),
    each narrowed to the rank's share of the intermediate features (matching gate and up rows, the
    same columns of down), and the block's first global expert id."""
    experts, intermediate = gate_up.shape[0], down.shape[2]
    check_experts(experts, intermediate, mapping)
    per = experts // mapping.ep
    block = slice(mapping.ep_rank * per, (mapping.ep_rank + 1) * per)
    share = intermediate // mapping.moe_tp
    cols = np.arange(mapping.moe_tp_rank * share, (mapping.moe_tp_rank + 1) * share)
    rows = np.concatenate([cols, cols + intermediate])
    return gate_up[block][:, rows], down[block][:, :, cols], block.start


@dataclass(frozen=True)
class LayerSplit:
    """One layer kind's split: how its weight divides and how its features group."""

    split: Split
    units: Units = Units.EVEN


@dataclass(frozen=True)
class TPPlan:
    """Everything the tensor-parallel rewrite needs for one rank: the mapping, the attention shape
    and each layer kind's split by the last parts of its module name (q_proj, attn.c_attn)."""

    mapping: Mapping
    heads: Heads
    layers: tuple[tuple[str, LayerSplit], ...]

    def of(self, module: str) -> LayerSplit | None:
        for suffix, layer in self.layers:
            if module == suffix or module.endswith("." + suffix):
                return layer
        return None

    def index(self, layer: LayerSplit, size: int) -> np.ndarray:
        return feature_index(layer.units, self.heads, self.mapping, size)

    @property
    def local_heads(self) -> tuple[int, int]:
        """The rank's query heads and KV heads (a replicated KV head counts on every rank)."""
        return len(self.heads.q_heads(self.mapping)), len(self.heads.kv_heads_of(self.mapping))


@dataclass(frozen=True)
class TensorParallel(Record):
    """The manifest's record of a tensor-parallel artifact: at its top, `ranks` names each rank's
    directory (relative); in a rank's own manifest, `rank` says which it is."""

    tp: int
    rank: int | None = None
    ranks: list[str] = field(default_factory=list)
    ep: int = 1  # expert groups among the ranks (a mixture of experts)

    def render(self) -> str:
        ep = f" ep {self.ep}" if self.ep > 1 else ""
        return f"tp {self.tp}{ep}" + (f", rank {self.rank}" if self.rank is not None else f": {', '.join(self.ranks)}")


@dataclass(frozen=True)
class RankReport(Record):
    """What the tensor-parallel rewrite did to one rank's graph."""

    rank: int
    counts: dict[str, int]  # column, row, embedding, lm_head, all_reduce, all_gather, kv_tensors
    fusions: dict[str, int]
    kv_heads: int | None
    weight_bytes: int

    def render(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        heads = f", {self.kv_heads} KV heads" if self.kv_heads is not None else ""
        return f"rank {self.rank}: {counts}{heads}, {self.weight_bytes / 1e6:.1f} MB of weights"
