"""KV-cache I/O naming: the one place the exporter, the KV pass and the runtime take names from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llm2trt.core.records import Record

KVKind = Literal["key", "value"]
KV_KINDS: tuple[KVKind, KVKind] = ("key", "value")

# Symbolic dims of cache tensors. "past_sequence" is what the cache holds before this step;
# "total_sequence" = past_sequence + sequence is what it holds after.
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"


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

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, k) for i in range(self.num_layers) for k in KV_KINDS]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, k) for i in range(self.num_layers) for k in KV_KINDS]

    def shape(self, sequence_dim: str) -> list[int | str]:
        if self.layout != "BHSD":
            raise ValueError(f"unknown KV layout {self.layout!r}")
        return ["batch", self.num_kv_heads, sequence_dim, self.head_dim]

    def to_dict(self) -> dict[str, Any]:
        # The names are derived, written for readers that do not know the naming rule.
        return {**super().to_dict(), "past_names": self.past_names, "present_names": self.present_names}
