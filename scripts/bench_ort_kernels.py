"""GPU time of llm2trt's one-row kernels (plugins/csrc) at the 1.1B Llama shape's layers, one table.

    python scripts/bench_ort_kernels.py            # on a CUDA machine with torch and nvcc

Each kernel is called through the library's `Llm2trtOneRow` entry (no ONNX Runtime in the way),
fp16, one row, `copies` launches with their own weights (more bytes than L2 holds) captured in one
CUDA graph and replayed; against torch's cuBLAS GEMV on the same weights. GB/s = weight bytes /
time, against the copy bandwidth measured in the same run. Each kernel's output is checked
against float32 torch first. The NBits kernels (INT4 / INT8 weights) of the same layers are timed
against these by scripts/check_nbits_kernel.py.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
from pathlib import Path

import torch
from common import copy_bandwidth

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLOAT16 = 10  # ONNX's element type

CASES = (  # op, K, N (weight rows), layer
    ("SkipRMSNormLinear", 2048, 2560, "qkv"),
    ("Linear", 2048, 2048, "o_proj"),
    ("SkipRMSNormSwiGLU", 2048, 11264, "gate+up"),
    ("Linear", 5632, 2048, "down"),
    ("SkipRMSNormLinear", 2048, 32000, "lm_head"),
    ("SkipRMSNormLinearF32", 2048, 32000, "lm_head32"),
    ("SkipRMSNormLinear", 576, 960, "smol qkv"),
    ("SkipRMSNormSwiGLU", 576, 3072, "smol g+u"),
    ("Linear", 1536, 576, "smol down"),
)


def load_library(defines: str = "") -> ctypes.CDLL:
    """The library as llm2trt builds it, or with `defines` (-DNAME=VALUE ...: a tuning variant)."""
    import llm2trt

    # In a checkout that is not installed, passes/ (the op table the build reads) imports as
    # llm2trt.passes only through pyproject's package-dir: the root on the package's path stands in.
    if str(ROOT) not in llm2trt.__path__:
        llm2trt.__path__.append(str(ROOT))
    spec = importlib.util.spec_from_file_location("ort_library", ROOT / "plugins" / "ort_library.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    major, minor = torch.cuda.get_device_capability(0)
    path = module.library(f"sm_{major}{minor}", tuple(defines.split()))
    return open_library(str(path))


def open_library(path: str) -> ctypes.CDLL:
    """A built library, its one-row entry typed (a library built beforehand needs no nvcc here)."""
    lib = ctypes.CDLL(path)
    lib.Llm2trtOneRow.restype = ctypes.c_int
    lib.Llm2trtOneRow.argtypes = [ctypes.c_char_p, ctypes.c_int, *[ctypes.c_void_p] * 6]
    lib.Llm2trtOneRow.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
    return lib


def reference(op: str, x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    v = x.float()
    if op.startswith("Skip"):
        v = (v + skip.float()).half().float()
    if "RMSNorm" in op:
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.float()
    z = v @ w.float().T
    if op.endswith("SwiGLU"):
        gate, up = z.chunk(2, dim=-1)
        z = torch.nn.functional.silu(gate) * up
    return z


def graph_us(launch: object, copies: int, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        launch()  # warm-up outside the capture
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            launch()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(replays):
            graph.replay()
        end.record(stream)
        end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays / copies


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", action="append", default=[], help="-DNAME=VALUE ... (a build to compare)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth:.0f} GB/s; fp16, one row, GPU time per call in a CUDA graph")
    for defines in args.variant or [""]:
        print(f"build: {defines or 'default'}")
        table(load_library(defines), bandwidth)
    return 0


def table(lib: ctypes.CDLL, bandwidth: float) -> None:
    print(
        f"{'layer':<10} {'op':<18} {'K':>5} {'N':>6} {'err':>9} {'kernel us':>10} {'% copy bw':>9}"
        f" {'cuBLAS us':>10} {'speed-up':>8}"
    )
    for op, k, n, label in CASES:
        print(case(lib, bandwidth, op, k, n, label))


def case(lib: ctypes.CDLL, bandwidth: float, op: str, k: int, n: int, label: str) -> str:
    nbytes = n * k * 2
    copies = max(2, -(-(400 << 20) // nbytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16, generator=g)
    skip = torch.randn(1, k, device="cuda", dtype=torch.float16, generator=g)
    gamma = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).half()
    n_out = n // 2 if op.endswith("SwiGLU") else n
    y_dtype = torch.float32 if op.endswith("F32") else torch.float16  # the logits' ops give float32
    ys = [torch.empty(1, n_out, device="cuda", dtype=y_dtype) for _ in range(copies)]
    total = torch.empty(1, k, device="cuda", dtype=torch.float16)

    def kernels() -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for w, y in zip(ws, ys, strict=True):
            pointers = (x, skip, gamma, w, y, total)
            rc = lib.Llm2trtOneRow(op.encode(), FLOAT16, *(t.data_ptr() for t in pointers), k, n, 1e-5, stream)
            if rc != 0:
                raise RuntimeError(f"{op}: launch failed")

    def cublas() -> None:
        for w in ws:  # the same weight bytes (for SwiGLU: gate and up, without the activation)
            torch.nn.functional.linear(x, w)

    kernels()
    torch.cuda.synchronize()
    want = reference(op, x, skip, gamma, ws[-1])
    err = float((ys[-1].float() - want).abs().max() / want.abs().max())
    ours = graph_us(kernels, copies)
    theirs = graph_us(cublas, copies)
    share = nbytes / (ours * 1e-6) / 1e9 / bandwidth
    return (
        f"{label:<10} {op:<18} {k:>5} {n:>6} {err:>9.1e} {ours:>10.2f} {share:>9.0%} {theirs:>10.2f}"
        f" {theirs / ours:>7.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
