"""The Int4GroupGemm kernel in Triton: one tile of y = x @ dequant(W)^T per program.

Weights are read packed (half a byte each) and dequantized in registers, so a batch-1 step reads
a quarter of fp16's weight bytes. tl.dot needs 16 rows, so decode (M = 1) computes a padded tile:
tensor-core time is not what bounds this kernel, memory is.

Its parameters follow TensorRT's ahead-of-time plugin ABI (inputs, then int32 scalars, then
outputs), so the same compiled kernel serves `llm2trt.plugins.int4_gemm_trt` and the torch launcher
below. Imported only where Triton is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from llm2trt.core.dtypes import DType


@triton.jit  # type: ignore[untyped-decorator]
def int4_group_gemm_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    x_ptr,  # [M, K] fp16/bf16
    w_ptr,  # [N, K/2] int8: even k in the low nibble, odd k in the high one
    s_ptr,  # [N, K/GROUP], x's type
    M,
    N,
    K,
    y_ptr,  # [M, N], x's type
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = w_ptr + rn[:, None] * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
    s_ptrs = s_ptr + rn[:, None] * (K // GROUP) + tl.arange(0, BLOCK_K // GROUP)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K):  # the launcher checks K % BLOCK_K == 0
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None], other=0.0)
        lo = ((b & 0xF) ^ 8) - 8  # the low nibble, signed
        hi = b >> 4  # arithmetic shift: the high nibble, signed
        q = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)  # interleaved back into k order
        w = q.to(tl.float32).reshape(BLOCK_N, BLOCK_K // GROUP, GROUP) * s.to(tl.float32)[:, :, None]
        acc = tl.dot(x, tl.trans(w.reshape(BLOCK_N, BLOCK_K).to(x.dtype)), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // GROUP
    y_ptrs = y_ptr + rm[:, None] * N + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit  # type: ignore[untyped-decorator]
def int4_group_gemv_kernel(  # type: ignore[no-untyped-def]  # the same ABI, one row of x per program
    x_ptr,
    w_ptr,
    s_ptr,
    M,
    N,
    K,
    y_ptr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # unused: one row per program (kept so both kernels take one tile)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode rows: no tensor-core tile to pad to 16 rows, so narrow column tiles (more programs in
    flight, more weight bytes requested at once) and a plain multiply-reduce on CUDA cores."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    x_ptrs = x_ptr + row * K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
    s_ptrs = s_ptr + rn[:, None] * (K // GROUP) + tl.arange(0, BLOCK_K // GROUP)[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K):
        x = tl.load(x_ptrs).to(tl.float32)
        b = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None], other=0.0).to(tl.float32)
        lo = ((b & 0xF) ^ 8) - 8
        hi = b >> 4
        q = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        xq = tl.sum((q * x[None, :]).reshape(BLOCK_N, BLOCK_K // GROUP, GROUP), axis=2)  # per group
        acc += tl.sum(xq * s, axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // GROUP
    tl.store(y_ptr + row * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # one row per program, no tensor cores (int4_group_gemv_kernel)

    def grid(self, m: int, n: int) -> tuple[int, int]:
        return triton.cdiv(n, self.block_n), m if self.gemv else triton.cdiv(m, self.block_m)

    @property
    def kernel(self) -> Any:
        return int4_group_gemv_kernel if self.gemv else int4_group_gemm_kernel


def _block_k(k: int, group: int, largest: int) -> int:
    block_k = max(group, largest)
    while k % block_k:
        block_k //= 2
    if block_k < group:
        raise ValueError(f"K={k} is not a multiple of the group size {group}")
    return block_k


def pick_tile(m: int, n: int, k: int, group: int) -> Tile:
    """The tile for a shape, from the H200 sweep (`scripts/bench_plugins.py --sweep`): one row
    (batch-1 decode) and narrow outputs take the GEMV kernel with a few columns per program and long
    K steps; a few rows take 16-row tensor-core tiles, wide ones 64 columns; prefill 64 x 64."""
    if m == 1 or (m <= 16 and n <= 1024):
        block_n = 2 if n <= 2048 else 4 if n <= 8192 else 8
        long_k = _block_k(k, group, 512 if block_n == 8 else 1024)
        return Tile(1, block_n, long_k, 2 if block_n == 4 else 1, 2 if block_n == 8 else 3, gemv=True)
    if m <= 16:
        wide = n >= 4096
        return Tile(16, 64 if wide else 16, _block_k(k, group, 128), 8 if wide else 4, 3)
    return Tile(64, 64, _block_k(k, group, 128), 4, 3)


def launch(x: Any, w: Any, s: Any, group: int, out: Any = None, tile: Tile | None = None) -> Any:
    """y = x @ dequant(w, s)^T for torch CUDA tensors; `out` (if given) receives it."""
    import torch

    k, n = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    if w.shape[1] * 2 != k or s.shape != (n, k // group) or w.dtype != torch.int8:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w {tuple(w.shape)}, s {tuple(s.shape)}")
    y = out if out is not None else torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    tile = tile or pick_tile(m, n, k, group)
    if k % tile.block_k or tile.block_k % group:
        raise ValueError(f"tile {tile} does not fit K={k}, group {group}")
    tile.kernel[tile.grid(m, n)](
        x2,
        w,
        s,
        m,
        n,
        k,
        y,
        GROUP=group,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return y


@dataclass(frozen=True)
class Compiled:
    """The kernel compiled to PTX for one dtype, group and tile: what TensorRT embeds in an engine."""

    name: str
    ptx: str
    tile: Tile
    shared_bytes: int
    threads: int


def compile_ptx(dtype: DType, group: int, tile: Tile, arch: int | None = None) -> Compiled:
    """Compile ahead of time (no GPU needed when `arch` is given, e.g. 90 for sm90).

    TensorRT launches the PTX with exactly the ABI arguments: Triton's hidden scratch pointers get
    null, so a kernel needing scratch memory is refused here rather than crashing there.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = dtype.triton
    signature = {
        "x_ptr": f"*{t}",
        "w_ptr": "*i8",
        "s_ptr": f"*{t}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "y_ptr": f"*{t}",
        "GROUP": "constexpr",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr",
    }
    constexprs = {"GROUP": group, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k}
    source = ASTSource(fn=tile.kernel, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32) if arch is not None else None
    compiled = triton.compile(
        source, target=target, options={"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    )
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(
                f"the Int4GroupGemm kernel needs {scratch}={getattr(meta, scratch)}; TensorRT passes none"
            )
    return Compiled(meta.name, compiled.asm["ptx"], tile, int(meta.shared), int(meta.num_warps) * 32)
