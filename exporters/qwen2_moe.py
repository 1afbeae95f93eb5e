"""Qwen2-MoE: Qwen2's attention (q/k/v biases) with routed experts plus a shared expert whose output
a sigmoid gate scales (the SharedMoE form); `mlp_only_layers` and `decoder_sparse_step` may leave
layers with a dense MLP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, TaskDecl
from llm2trt.exporters.moe import MoESpec


class Qwen2MoESpec(MoESpec):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    config_class = "Qwen2MoeConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    }
    expert_classes = ("Qwen2MoeExperts",)
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (2, 1), "RoPE": (2, 0)}
    # The shared expert's gate_proj/up_proj/down_proj split as a dense MLP's (by suffix).
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {"Qwen2MoeForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "Qwen2MoeForCausalLM"
