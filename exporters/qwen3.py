"""Qwen3: the Llama graph plus an RMSNorm on each head's queries and keys before RoPE (QK-norm),
and a head size set by the config rather than hidden / heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, DecoderSpec, TaskDecl


class Qwen3Spec(DecoderSpec):
    name = "qwen3"
    model_types = ("qwen3",)
    config_class = "Qwen3Config"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # not hidden / heads (16): the projections widen the attention
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    }
    # input and post-attention norms, q_norm and k_norm per layer, the final norm; RoPE on Q and K.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (4, 1), "RoPE": (2, 0)}
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {"Qwen3ForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "Qwen3ForCausalLM"
