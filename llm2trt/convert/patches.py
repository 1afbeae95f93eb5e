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
