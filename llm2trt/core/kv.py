"""KV-cache I/O naming and the symbolic dims: the one place the exporter, the KV passes, the build
profiles and the runtime take them from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from llm2trt.core.records import Record

KVKind = Literal["key", "value"]
KV_KINDS: tuple[KVKind, KVKind] = ("key", "value")

BATCH = "batch"
SEQUENCE = "sequence"
# Symbolic dims of cache tensors. A growing cache holds "past_sequence" tokens before this step
# and "total_sequence" = past_sequence + sequence after; a fixed buffer always holds
# "cache_sequence" slots, of which each row's valid ones are those before its position.
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"
CACHE_SEQUENCE = "cache_sequence"

# The two cache forms of today's ONNX (README: "KV cache"):
# growing: past_key_values.{i}.* -> Concat -> present.{i}.* (one token longer each step);
# fixed:   a buffer of cache_sequence slots; TensorScatter writes the new keys and values at each
#          row's position and present.{i}.* is the same buffer, updated (in place where bound so).
# gqa:     a fixed buffer that ONNX Runtime's com.microsoft.GroupQueryAttention updates in place
#          (its CUDA decoders' vocabulary; for ONNX Runtime only, never TensorRT).
KVForm = Literal["growing", "fixed", "gqa"]
GROWING: Final = "growing"
FIXED: Final = "fixed"
GQA: Final = "gqa"
KV_FORMS: tuple[KVForm, ...] = (GROWING, FIXED, GQA)
# What a gqa graph takes instead of positions: each row's valid length - 1, and the longest (int32).
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
GQA_COUNTERS = (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)


@dataclass(frozen=True)
class FormTraits:
    """What a cache form means to the stages, asked of the graph's layout once (`KVLayout.traits`)
    instead of each stage comparing form names."""

    buffer: bool  # a fixed-size buffer written in place, rather than a cache one token longer each step
    tensorrt: bool  # TensorRT builds it
    cuda_session: bool  # ONNX Runtime CUDA runs it GPU-resident, the decode step a captured CUDA graph
    counters: tuple[str, ...] = ()  # what the graph takes instead of positions


FORMS: dict[KVForm, FormTraits] = {
    GROWING: FormTraits(buffer=False, tensorrt=True, cuda_session=False),
    FIXED: FormTraits(buffer=True, tensorrt=True, cuda_session=True),
    GQA: FormTraits(buffer=True, tensorrt=False, cuda_session=True, counters=GQA_COUNTERS),
}


def past_name(layer: int, kind: KVKind) -> str:
    """Graph input holding layer `layer`'s cached keys or values."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: KVKind) -> str:
    """Graph output holding layer `layer`'s keys or values after this step."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class KVLayout(Record):
    """Shape of a decoder's KV cache; `layout` names the axis order of each cache tensor."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # (batch, kv_heads, sequence, head_dim): what transformers' caches and ONNX Attention-23 use.
    layout: str = "BHSD"
    form: KVForm = GROWING
    # Sliding-window attention: per layer, how many of the latest positions a query sees (itself
    # included); 0 or no entry: all of them. Empty: no layer slides.
    windows: tuple[int, ...] = ()
    # The cache's element type where it is not the model's (an INT8 cache: `--kv-dtype int8`), as
    # DType names it; a name, not a DType, so that this module stays light for the CLI.
    dtype: str | None = None

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (0: global attention)."""
        return self.windows[layer] if layer < len(self.windows) else 0

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, k) for i in range(self.num_layers) for k in KV_KINDS]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, k) for i in range(self.num_layers) for k in KV_KINDS]

    def shape(self, sequence_dim: str) -> list[int | str]:
        if self.layout != "BHSD":
            raise ValueError(f"unknown KV layout {self.layout!r}")
        return [BATCH, self.num_kv_heads, sequence_dim, self.head_dim]

    @property
    def traits(self) -> FormTraits:
        return FORMS[self.form]

    @property
    def is_buffer(self) -> bool:
        """A fixed-size buffer (fixed, gqa), rather than a cache that grows by a token a step."""
        return self.traits.buffer

    @property
    def past_dim(self) -> str:
        return CACHE_SEQUENCE if self.is_buffer else PAST_SEQUENCE

    @property
    def present_dim(self) -> str:
        return CACHE_SEQUENCE if self.is_buffer else TOTAL_SEQUENCE

    def past_shapes(self) -> list[tuple[str, list[int | str]]]:
        """Graph inputs of the cache, in graph order: (name, symbolic shape)."""
        return [(name, self.shape(self.past_dim)) for name in self.past_names]

    def present_shapes(self) -> list[tuple[str, list[int | str]]]:
        """Graph outputs of the cache, in graph order: (name, symbolic shape)."""
        return [(name, self.shape(self.present_dim)) for name in self.present_names]

    def to_dict(self) -> dict[str, Any]:
        # The names are derived, written for readers that do not know the naming rule.
        return {**super().to_dict(), "past_names": self.past_names, "present_names": self.present_names}
