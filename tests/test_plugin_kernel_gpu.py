"""The Int4GroupGemm Triton kernel against the NumPy reference, on a CUDA GPU (`pytest -m gpu` on a
machine with one; deselected by default).

Outputs are poisoned (NaN) before every run, so a tile the kernel fails to write shows up."""

from __future__ import annotations

import numpy as np
import pytest

from llm2trt.plugins.int4_gemm import pack, reference

pytestmark = pytest.mark.gpu

# (M, N, K, group): decode and prefill rows, the 1.1B Llama's layer shapes, ragged M and N.
SHAPES = [
    (1, 2048, 2048, 128),
    (1, 256, 2048, 64),
    (3, 5632, 2048, 128),
    (4, 300, 1024, 32),
    (16, 2048, 5632, 128),
    (1, 32000, 2048, 32),
    (77, 1000, 512, 128),
    (512, 2048, 2048, 128),
]
TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize(("m", "n", "k", "group"), SHAPES)
def test_kernel_matches_the_reference(m: int, n: int, k: int, group: int, dtype: str) -> None:
    import torch

    from llm2trt.plugins.int4_gemm_kernel import launch

    rng = np.random.default_rng(m * 7 + n)
    q = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
    tdtype = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(tdtype)
    s = torch.from_numpy((rng.random((n, k // group)) * 0.02 + 0.005).astype(np.float32)).to(tdtype)
    w = torch.from_numpy(pack(q))
    # The reference sees the same rounded inputs the kernel does.
    ref = reference(x.float().numpy().astype(np.float64), w.numpy(), s.float().numpy().astype(np.float64), group)
    xd, wd, sd = x.cuda(), w.cuda(), s.cuda()
    for _ in range(2):
        out = torch.full((m, n), float("nan"), dtype=tdtype, device="cuda")
        launch(xd, wd, sd, group, out=out)
        torch.cuda.synchronize()
        got = out.float().cpu().numpy().astype(np.float64)
        assert np.isfinite(got).all(), "the kernel left poisoned outputs"
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= TOLERANCE[dtype], f"relative error {err:.2e}"
