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
