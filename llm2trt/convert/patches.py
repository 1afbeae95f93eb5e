"""Export-time patches: small, scoped changes to how a model traces, undone afterwards."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from llm2trt.core.dtypes import DType


@contextlib.contextmanager
def sdpa_for_export() -> Iterator[None]:
    """Work around two TorchScript-exporter problems with scaled_dot_product_attention.

    1. transformers passes a bool mask; the exporter turns it into an fp32 0/-inf mask plus a NaN
       guard, which promotes fp16/bf16 attention (and the projection after it) to fp32 and hides
       the attention pattern behind Where/IsNaN nodes. An additive mask of the query's dtype
       traces to MatMul, Add, Softmax, MatMul in the model's own precision.
    2. An explicit `scale` in a bf16 graph fails the export ("ScalarType ComplexDouble is an
       unexpected tensor scalar type", torch 2.13). There the scale moves onto the query, relative
       to the default 1/sqrt(head_dim) the exporter then applies.
    """
    import torch

    functional: Any = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def patched(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            lowest = torch.finfo(query.dtype).min
            attn_mask = torch.zeros((), dtype=query.dtype).masked_fill(~attn_mask, lowest)
        scale = kwargs.get("scale")
        if DType.find(query.dtype) is DType.BF16 and scale is not None:
            query = query * (float(scale) * math.sqrt(query.shape[-1]))
            kwargs["scale"] = None
        return original(query, key, value, attn_mask, *args, **kwargs)  # type: ignore[no-any-return]

    functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def longrope_for_export(model: Any) -> Iterator[None]:
    """Trace LongRoPE's choice of frequencies as a graph op.

    transformers picks the short or long factors by the longest position of the call and writes
    them into the rotary module's buffer in place (`copy_`), which the TorchScript exporter cannot
    express. For the trace, each LongRoPE module computes the same choice with `where` and hands it
    to the unwrapped forward instead, so the graph switches to the long factors exactly where
    transformers does.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    patched = []
    for module in model.modules():
        inner = getattr(type(module).forward, "__wrapped__", None)
        if getattr(module, "rope_type", None) != "longrope" or inner is None:
            continue
        original = int(module.config.rope_parameters["original_max_position_embeddings"])
        long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, None, seq_len=original + 1)
        short_freq = module.original_inv_freq

        def forward(
            x: Any,
            position_ids: Any,
            _m: Any = module,
            _inner: Any = inner,
            _long: Any = long_freq,
            _short: Any = short_freq,
            _original: int = original,
        ) -> Any:
            chosen = torch.where(position_ids.max() + 1 > _original, _long, _short)
            kept = _m.inv_freq
            _m.inv_freq = chosen
            try:
                return _inner(_m, x, position_ids)
            finally:
                _m.inv_freq = kept

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@contextlib.contextmanager
def experts_for_export(model: Any, classes: tuple[str, ...]) -> Iterator[int]:
    """Trace each experts module (`classes`, transformers' 3-D `gate_up_proj`/`down_proj` holders
    called with the routed ids and weights) as one `llm2trt.MoE` node (passes/moe.py says why);
    yields how many were patched."""
    import torch

    from llm2trt.passes.ort_op_table import DOMAIN, MOE

    class RoutedExperts(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, ids: Any, weights: Any, gate_up: Any, down: Any, first_expert: int) -> Any:
            # The value only types the trace: the node replaces it, and nothing traced after it
            # branches on it. (Computing the experts here puts their ops in the node's traced body,
            # which the exporter's peephole pass then fails on.)
            return torch.zeros_like(x)

        @staticmethod
        def symbolic(g: Any, x: Any, ids: Any, weights: Any, gate_up: Any, down: Any, first_expert: int) -> Any:
            node = g.op(f"{DOMAIN}::{MOE.name}", x, ids, weights, gate_up, down, first_expert_i=first_expert)
            return node.setType(x.type())

    patched = []
    for module in model.modules():
        if type(module).__name__ not in classes:
            continue

        def forward(hidden_states: Any, top_k_index: Any, top_k_weights: Any, _m: Any = module) -> Any:
            weights = top_k_weights.float()  # the op mixes in float32 (Mixtral's router hands float32 over)
            apply: Any = RoutedExperts.apply  # (untyped in torch)
            return apply(hidden_states, top_k_index, weights, _m.gate_up_proj, _m.down_proj, 0)

        module.forward = forward
        patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
