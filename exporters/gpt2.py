"""GPT-2: learned positions, fused QKV Conv1D, LayerNorm, tanh-GELU."""

from __future__ import annotations

from typing import Any, ClassVar

from llm2trt.core.tp import Split, Units
from llm2trt.exporters.base import DecoderSpec, TaskDecl


class GPT2Spec(DecoderSpec):
    name = "gpt2"
    model_types = ("gpt2",)
    config_class = "GPT2Config"
    tiny_config: ClassVar[dict[str, Any]] = {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_positions": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "vocab_size": 1000,
    }
    # ln_1 and ln_2 per block, ln_f at the end; tanh GELU in the MLP.
    fusions_per_layer: ClassVar[dict[str, tuple[int, int]]] = {"Attention": (1, 0), "LayerNorm": (2, 1), "Gelu": (1, 0)}
    # c_attn packs q, k and v: split by heads within each of the three; biases go with the columns.
    tp_splits: ClassVar[dict[str, Split]] = {
        **dict.fromkeys(("attn.c_attn", "mlp.c_fc"), Split.COLUMN),
        **dict.fromkeys(("attn.c_proj", "mlp.c_proj"), Split.ROW),
        **dict.fromkeys(("wte", "lm_head"), Split.VOCAB),
    }
    tp_units: ClassVar[dict[str, Units]] = {"attn.c_attn": Units.QKV, "attn.c_proj": Units.Q}
    classes: ClassVar[dict[str, TaskDecl]] = {
        "GPT2LMHeadModel": TaskDecl("text-generation", ("logits",)),
    }
    default_class = "GPT2LMHeadModel"

    def position_limit(self, config: Any) -> int | None:
        return int(config.n_positions)
