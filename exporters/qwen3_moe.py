"""Qwen3-MoE: Qwen3's attention (QK-norm, its own head size) with many small experts, top-k routed,
renormalized when `norm_topk_prob` says so."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, TaskDecl
from llm2trt.exporters.moe import MoESpec


class Qwen3MoESpec(MoESpec):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    config_class = "Qwen3MoeConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "norm_topk_prob": True,
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    expert_classes = ("Qwen3MoeExperts",)
    # input and post-attention norms, q_norm and k_norm per layer, the final norm; RoPE on Q and K.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (4, 1), "RoPE": (2, 0)}
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {"Qwen3MoeForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "Qwen3MoeForCausalLM"
