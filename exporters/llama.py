"""Llama family: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Mistral and Qwen2 share the graph (Qwen2 adds biases on q/k/v; Mistral may set a sliding
window), so one spec takes all three `model_type` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, DecoderSpec, TaskDecl


class LlamaSpec(DecoderSpec):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    config_class = "LlamaConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA: fewer KV heads than heads
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    # input and post-attention norms per layer plus the final norm; RoPE on Q and on K.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "RMSNorm": (2, 1), "RoPE": (2, 0)}
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {
        "LlamaForCausalLM": TaskDecl("text-generation", ("logits",)),
        "MistralForCausalLM": TaskDecl("text-generation", ("logits",)),
        "Qwen2ForCausalLM": TaskDecl("text-generation", ("logits",)),
    }
    default_class = "LlamaForCausalLM"

    def fallback_class(self, config: Any) -> str:
        # A config may name no class (GGUF, hand-written configs): take the family's own.
        by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        return by_type.get(getattr(config, "model_type", "llama"), self.default_class)
