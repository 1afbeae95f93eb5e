"""What the mixture-of-experts decoders share: experts traced as llm2trt.MoE nodes (one per MoE
layer, counted like a fusion), the router left in the graph as a plain projection."""

from __future__ import annotations

from typing import Any

from llm2trt.exporters.base import DecoderSpec


class MoESpec(DecoderSpec):
    """Each MoE layer's experts are one MoE node; Qwen2-MoE's `mlp_only_layers` and
    `decoder_sparse_step` leave some layers dense (see moe_layers)."""

    def moe_layers(self, config: Any) -> list[int]:
        """The layers whose MLP is a mixture of experts."""
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return [i for i in range(self.num_layers(config)) if i not in dense and (i + 1) % step == 0]

    def experts(self, config: Any) -> tuple[int, int] | None:
        count = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
        size = int(getattr(config, "moe_intermediate_size", 0) or config.intermediate_size)
        return count, size

    def expected_fusions(self, config: Any) -> dict[str, int]:
        counts = super().expected_fusions(config)
        counts["MoE"] = len(self.moe_layers(config))
        return counts
