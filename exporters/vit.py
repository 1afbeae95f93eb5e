"""ViT: patch embedding, pre-LayerNorm encoder, unmasked attention."""

from __future__ import annotations

from typing import Any, ClassVar

from llm2trt.exporters.base import TaskDecl, VisionEncoderSpec


class ViTSpec(VisionEncoderSpec):
    name = "vit"
    model_types = ("vit",)
    config_class = "ViTConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "num_labels": 10,
    }
    # two pre-LayerNorms per layer plus the final one; erf GELU.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "LayerNorm": (2, 1), "Gelu": (1, 0)}
    classes: ClassVar[dict[str, TaskDecl]] = {
        "ViTForImageClassification": TaskDecl("image-classification", ("logits",)),
        "ViTModel": TaskDecl("feature-extraction", ("last_hidden_state", "pooler_output")),
    }
    default_class = "ViTForImageClassification"
