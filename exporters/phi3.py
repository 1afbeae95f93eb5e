"""Phi-3: the Llama graph with q, k and v in one projection (`qkv_proj`), gate and up in one
(`gate_up_proj`), and LongRoPE scaling (short or long factors chosen in the graph by the longest
position)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.kv import GQA
from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import DecoderSpec, TaskDecl


class Phi3Spec(DecoderSpec):
    name = "phi3"
    model_types = ("phi3",)
    config_class = "Phi3Config"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 32,
        "vocab_size": 1000,
        # LongRoPE: 8 rotary frequency pairs (head size 16); past 32 positions the long factors apply.
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0],
            "long_factor": [1.0, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0],
            "original_max_position_embeddings": 32,
        },
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (2, 1), "RoPE": (2, 0)}
    # qkv_proj splits by whole heads of each part, gate_up_proj by matching columns of each half.
    tp_splits: ClassVar[dict[str, Split]] = {
        **dict.fromkeys(("qkv_proj", "gate_up_proj"), Split.COLUMN),
        **dict.fromkeys(("o_proj", "down_proj"), Split.ROW),
        **dict.fromkeys(("embed_tokens", "lm_head"), Split.VOCAB),
    }
    tp_units: ClassVar[dict[str, Units]] = {"qkv_proj": Units.QKV, "o_proj": Units.Q, "gate_up_proj": Units.HALVES}
    classes: ClassVar[dict[str, TaskDecl]] = {"Phi3ForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "Phi3ForCausalLM"

    def refused_kv_forms(self, config: Any) -> dict[str, str]:
        # GroupQueryAttention's rotary tables are one constant row per position; LongRoPE's depend
        # on the longest position of the call as well (short factors up to the original length, long
        # ones for every position past it). Phi-3 without LongRoPE takes every form.
        if _rope(config)[0] != "longrope":
            return {}
        return {
            GQA: "LongRoPE rotates by factors chosen from the longest position of each call, which "
            "GroupQueryAttention's per-position rotary tables cannot hold"
        }

    def cache_refill_length(self, config: Mapping[str, Any]) -> int | None:
        """The length at which generation runs the whole sequence again (None: never).

        transformers' Phi3ForCausalLM.prepare_inputs_for_generation drops the cache when the
        sequence first grows past original_max_position_embeddings, so every position, the cached
        ones included, is rotated again with LongRoPE's long factors. A graph cannot re-rotate its
        cache: the generate loop prefills the whole sequence there instead. Only LongRoPE needs it
        (with one set of frequencies the recomputed cache is the cached one).
        """
        kind, original = _rope(config)
        return original + 1 if kind == "longrope" and original else None


def _rope(config: Any) -> tuple[str | None, int | None]:
    """The rotary scaling type and original length, from a transformers config or a mapping of it."""

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    rope = get("rope_parameters") or get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        return None, None
    original = get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    return rope.get("rope_type", rope.get("type")), int(original) if original else None
