"""BERT: post-LayerNorm encoder with a padding mask and segment embeddings."""

from __future__ import annotations

from typing import Any, ClassVar

from llm2trt.exporters.base import TaskDecl, TextEncoderSpec


class BertSpec(TextEncoderSpec):
    name = "bert"
    model_types = ("bert",)
    config_class = "BertConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        "type_vocab_size": 2,
    }
    # two post-LayerNorms per layer plus the embeddings' LayerNorm; erf GELU.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "LayerNorm": (2, 1), "Gelu": (1, 0)}
    classes: ClassVar[dict[str, TaskDecl]] = {
        "BertModel": TaskDecl("feature-extraction", ("last_hidden_state", "pooler_output")),
        "BertForMaskedLM": TaskDecl("fill-mask", ("logits",)),
    }
    default_class = "BertModel"
