"""The CUDA decoder's pure pieces (llm2trt/backends/onnxruntime/cuda.py), checked without a GPU: the prefill buckets
and the two-step greedy pick. The decoder itself runs on a CUDA GPU (scripts/gpu_tokens.py)."""

from __future__ import annotations

import pytest
import torch

from llm2trt.backends.onnxruntime.cuda import greedy_pick, prefill_width


def test_prefill_buckets_waste_at_most_half_and_stop_at_capacity() -> None:
    widths = [prefill_width(w, 4096) for w in range(1, 4097)]
    assert sorted(set(widths))[:8] == [16, 24, 32, 48, 64, 96, 128, 192]
    assert all(w <= b <= max(16, 3 * w // 2 + 1) for w, b in zip(range(1, 4097), widths, strict=True))
    assert len(set(widths)) == 17  # graphs per batch size for a 4,096-slot cache
    assert prefill_width(600, 520) == 520 and prefill_width(512, 4096) == 512


@pytest.mark.parametrize("vocab", [32000, 49152, 50257, 1000, 7])
def test_greedy_pick_is_argmax_with_its_tie_rule(vocab: int) -> None:
    """Coarse integer logits make ties common: the first maximum wins, as in torch.argmax."""
    g = torch.Generator().manual_seed(vocab)
    for dtype in (torch.float16, torch.float32):
        logits = torch.randint(-3, 4, (5, vocab), generator=g).to(dtype)
        assert torch.equal(greedy_pick(logits), torch.argmax(logits, dim=-1, keepdim=True))
