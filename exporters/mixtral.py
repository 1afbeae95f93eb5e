"""Mixtral: the Llama graph (RMSNorm, RoPE, grouped-query attention) with a mixture of experts for
its MLP: softmax over the experts, the top k kept and renormalized, SwiGLU experts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, TaskDecl
from llm2trt.exporters.moe import MoESpec


class MixtralSpec(MoESpec):
    name = "mixtral"
    model_types = ("mixtral",)
    config_class = "MixtralConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    }
    expert_classes = ("MixtralExperts",)
    # input and post-attention norms per layer plus the final norm; RoPE on Q and on K.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (2, 1), "RoPE": (2, 0)}
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {"MixtralForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "MixtralForCausalLM"
