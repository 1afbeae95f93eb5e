"""BLOOM: ALiBi position biases instead of rotary positions, a LayerNorm on the embeddings, q/k/v in
one projection interleaved by head, GELU (tanh) and a tied output projection."""

from __future__ import annotations

from typing import Any, ClassVar

from llm2trt.core.dtypes import DType
from llm2trt.core.kv import BATCH, GROWING, SEQUENCE, TOTAL_SEQUENCE
from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import DecoderSpec, GraphVariant, TaskDecl

_IDS = {"input_ids": (DType.INT64, (BATCH, SEQUENCE))}
_WHY = "ALiBi counts positions from the attention mask, which the fixed-buffer forms drop"


class BloomSpec(DecoderSpec):
    name = "bloom"
    model_types = ("bloom",)
    config_class = "BloomConfig"
    tiny_config: ClassVar[dict[str, Any]] = {
        "n_layer": 2,
        "hidden_size": 64,
        "n_head": 4,
        "vocab_size": 1000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    # No position_ids: ALiBi's biases come from the attention mask (left padding included).
    variants: ClassVar[tuple[GraphVariant, ...]] = (
        GraphVariant("decoder", {**_IDS, "attention_mask": (DType.INT64, (BATCH, TOTAL_SEQUENCE))}, kv_form=GROWING),
        GraphVariant("logits", {**_IDS, "attention_mask": (DType.INT64, (BATCH, SEQUENCE))}),
    )
    kv_forms_refused: ClassVar[dict[str, str]] = {"fixed": _WHY, "gqa": _WHY}
    # transformers has no sdpa attention for BLOOM (its ALiBi bias goes into a baddbmm).
    attn_implementations: ClassVar[tuple[str, ...]] = ("eager",)
    # input and post-attention LayerNorms per layer, the embeddings' and the final one.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "LayerNorm": (2, 2), "Gelu": (1, 0)}
    tp_splits: ClassVar[dict[str, Split]] = {
        **dict.fromkeys(("self_attention.query_key_value", "mlp.dense_h_to_4h"), Split.COLUMN),
        **dict.fromkeys(("self_attention.dense", "mlp.dense_4h_to_h"), Split.ROW),
        **dict.fromkeys(("word_embeddings", "lm_head"), Split.VOCAB),
    }
    tp_units: ClassVar[dict[str, Units]] = {
        "self_attention.query_key_value": Units.QKV_BY_HEAD,
        "self_attention.dense": Units.Q,
    }
    classes: ClassVar[dict[str, TaskDecl]] = {"BloomForCausalLM": TaskDecl("text-generation", ("logits",))}
    default_class = "BloomForCausalLM"

    def position_limit(self, config: Any) -> int | None:
        return None  # ALiBi has no position table: the profile's own maximum applies
