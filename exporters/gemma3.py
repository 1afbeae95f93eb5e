"""Gemma 3 (text): interleaved sliding-window and global layers with their own RoPE bases,
QK-norm, four RMSNorms a layer (scaled by 1 + weight), GeGLU, embeddings scaled by sqrt(hidden)
and a tied output projection.

The multimodal checkpoint (Gemma3ForConditionalGeneration) exports its text tower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import SEPARATE_QKV_SPLITS, SEPARATE_QKV_UNITS, DecoderSpec, TaskDecl, require


class Gemma3Spec(DecoderSpec):
    name = "gemma3"
    model_types = ("gemma3_text", "gemma3")
    config_class = "Gemma3TextConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "max_position_embeddings": 256,
        "vocab_size": 1000,
        # A window shorter than the tests' prompts plus their new tokens, so it decides the output.
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,  # one the random weights never pick for the tests' prompts: all tokens compared
    }
    # input, post-attention, pre- and post-feedforward norms, q_norm and k_norm per layer, the final
    # norm; RoPE on Q and K; the tanh GELU of the gated MLP.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {
        "Attention": (1, 0),
        "RMSNorm": (6, 1),
        "RoPE": (2, 0),
        "Gelu": (1, 0),
    }
    # The 270M model's residual peaks near 104,000 on <bos>-led prompts (fp16 ends at 65,504).
    fp16_residual_in_float32 = True
    tp_splits: ClassVar[Mapping[str, Split]] = SEPARATE_QKV_SPLITS
    tp_units: ClassVar[Mapping[str, Units]] = SEPARATE_QKV_UNITS
    classes: ClassVar[dict[str, TaskDecl]] = {"Gemma3ForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "Gemma3ForCausalLM"

    def export_config(self, config: Any) -> Any:
        text = getattr(config, "text_config", None)
        if getattr(config, "model_type", None) != "gemma3" or text is None:
            return config
        text.architectures = [self.default_class]
        return text

    def from_pretrained(self, cls: Any, location: str, config: Any, **kwargs: Any) -> Any:
        """The multimodal checkpoint's text tower as a Gemma3ForCausalLM (its weights live under
        the language model's prefix, which the causal-LM class alone does not read)."""
        raw = json.loads((Path(location) / "config.json").read_text())
        if raw.get("model_type") != "gemma3":
            return super().from_pretrained(cls, location, config, **kwargs)
        import torch
        import transformers

        full = transformers.Gemma3ForConditionalGeneration.from_pretrained(location, **kwargs)
        with torch.device("meta"):
            model = cls(config)
        model.model = full.model.language_model
        model.lm_head = full.lm_head
        model.config = model.model.config
        model.generation_config = full.generation_config
        return model

    def check_config(self, config: Any) -> None:
        require(
            getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "attn_logit_softcapping", None) is None,
            "gemma3: logit soft-capping is not supported (Gemma 2 style); Gemma 3 configs set none",
        )
        super().check_config(config)
