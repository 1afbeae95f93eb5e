"""Export-time patches: small, scoped changes to how a model traces, undone afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def additive_sdpa_masks() -> Iterator[None]:
    """Hand scaled_dot_product_attention an additive mask in the query's dtype.

    transformers passes sdpa a bool mask; the TorchScript exporter turns it into an fp32 0/-inf mask
    plus a NaN guard, which promotes fp16/bf16 attention (and the projection after it) to fp32
    and hides the attention pattern behind Where/IsNaN nodes. An additive mask of the query's
    dtype traces to MatMul, Add, Softmax, MatMul in the model's own precision.
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
        return original(query, key, value, attn_mask, *args, **kwargs)  # type: ignore[no-any-return]

    functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
