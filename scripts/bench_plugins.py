"""Int4GroupGemm on the GPU: the Triton kernel against the unfused torch ops, cuBLAS on fp16 weights and
ONNX Runtime CUDA running the op's reference body, with the memory-bandwidth floor. One run, one table.

    bash scripts/gpu_decode.sh python3 scripts/bench_plugins.py [--sweep]

Shapes are the ~1.1B Llama's linear layers (hidden 2048, intermediate 5632, 32/4 heads, vocab
32000), int4 in groups of 128, fp16 activations; M = 1 is batch-1 decode, M = 16 batch-16 decode.
Floor = bytes the op must move (packed weights, scales, x, y) / the copy bandwidth measured in
the same run. Times are medians of CUDA-event-timed runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from common import copy_bandwidth, cuda_median_us

LAYERS = {
    "q/o_proj": (2048, 2048),
    "k/v_proj": (256, 2048),
    "gate/up": (5632, 2048),
    "down": (2048, 5632),
    "lm_head": (32000, 2048),
}
GROUP = 128


def median_us(fn: Callable[[], Any], repeat: int = 30, calls: int = 20) -> float:
    """GPU time per call: `calls` calls captured in one CUDA graph, replayed `repeat` times (timing
    single Python-launched calls would measure the launch overhead, not the kernel)."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_median_us(graph.replay, repeat) / calls


def looped_us(fn: Callable[[], Any], repeat: int = 30, calls: int = 20) -> float:
    """Per call over `calls` back-to-back calls: for runtimes with their own graph replay (ONNX Runtime)."""
    for _ in range(3):
        fn()
    return cuda_median_us(lambda: [fn() for _ in range(calls)], repeat) / calls


def dequantize_torch(w: Any, s: Any, group: int) -> Any:
    """The unfused torch ops: unpack the nibbles, scale per group (what a plugin-less runtime does)."""
    import torch

    lo = ((w & 0xF) ^ 8) - 8
    hi = w >> 4
    q = torch.stack([lo, hi], dim=-1).reshape(w.shape[0], -1).to(s.dtype)
    return (q.reshape(q.shape[0], -1, group) * s[..., None]).reshape(q.shape)


def ort_session(n: int, k: int, w: np.ndarray, s: np.ndarray) -> Any:
    """ONNX Runtime CUDA on a one-node graph: the op, its local function, the weights initializers."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from llm2trt.plugins.int4_gemm import function, make_node

    x = gs.Variable("x", dtype=np.float16, shape=["m", k])
    y = gs.Variable("y", dtype=np.float16, shape=["m", n])
    node = make_node(x, gs.Constant("w", w), gs.Constant("s", s), GROUP, y, "int4_group_gemm")
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21, functions=[function(21)])
    model = gs.export_onnx(graph)
    model.ir_version = 10
    # Its own CUDA graph (captured at the first run on these bound buffers): ONNX Runtime at its best.
    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    return ort.InferenceSession(model.SerializeToString(), providers=providers)


def ort_runner(session: Any, x: Any, y: Any) -> Callable[[], None]:
    binding = session.io_binding()
    binding.bind_input("x", "cuda", 0, np.float16, list(x.shape), x.data_ptr())
    binding.bind_output("y", "cuda", 0, np.float16, list(y.shape), y.data_ptr())
    return lambda: session.run_with_iobinding(binding)


def sweep(m: int, n: int, k: int, args: tuple[Any, ...]) -> tuple[Any, float]:
    from llm2trt.plugins.int4_gemm_kernel import Tile, launch

    best: tuple[Any, float] | None = None
    tiles = [
        Tile(16 if m <= 16 else 64, bn, bk, w, st)
        for bn in (16, 32, 64)
        for bk in (128, 256)
        for w in (4, 8)
        for st in (3, 4)
    ]
    tiles += [
        Tile(1, bn, bk, w, st, gemv=True)
        for bn in (2, 4, 8, 16)
        for bk in (256, 512, 1024)
        for w in (1, 2, 4)
        for st in (2, 3)
    ]
    for tile in tiles:
        try:
            took = median_us(lambda t=tile: launch(*args, GROUP, tile=t), 10)
        except Exception:  # a tile that does not compile (shared memory) is skipped
            continue
        if best is None or took < best[1]:
            best = (tile, took)
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also search tiles and print the best per shape")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    opts = parser.parse_args()
    import torch

    from llm2trt.plugins.int4_gemm import pack

    bandwidth = copy_bandwidth() * 1e9  # bytes per second
    print(f"device: {torch.cuda.get_device_name(0)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; fp16, group {GROUP}")
    head = ("layer", "M", "N", "K", "kernel us", "floor us", "% floor", "torch unfused", "x", "cuBLAS fp16", "x")
    print("{:<9} {:>3} {:>6} {:>5} {:>9} {:>8} {:>7} {:>13} {:>5} {:>11} {:>5}".format(*head), end="")
    print(" {:>8} {:>6}".format("ORT ref", "x"))
    rng = np.random.default_rng(0)
    for name, (n, k) in LAYERS.items():
        w_np = pack(rng.integers(-8, 8, size=(n, k), dtype=np.int8))
        s_np = (rng.random((n, k // GROUP)) * 0.02).astype(np.float16)
        for m in opts.rows:
            _row(name, m, w_np, s_np, bandwidth, opts.sweep)


def _row(name: str, m: int, w_np: np.ndarray, s_np: np.ndarray, bandwidth: float, search: bool) -> None:
    """One table row: the same weights and input through every implementation."""
    import torch

    from llm2trt.plugins.int4_gemm_kernel import launch, pick_tile

    n, k = w_np.shape[0], w_np.shape[1] * 2
    w, s = torch.from_numpy(w_np).cuda(), torch.from_numpy(s_np).cuda()
    dense = dequantize_torch(w, s, GROUP).contiguous()
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    y = torch.empty(m, n, dtype=torch.float16, device="cuda")
    kernel = median_us(lambda: launch(x, w, s, GROUP, out=y))
    unfused = median_us(lambda: x @ dequantize_torch(w, s, GROUP).T)
    cublas = median_us(lambda: x @ dense.T)
    ort_us = looped_us(ort_runner(ort_session(n, k, w_np, s_np), x, y))
    floor = (n * k // 2 + s.numel() * 2 + x.numel() * 2 + y.numel() * 2) / bandwidth * 1e6
    cells = f"{name:<9} {m:>3} {n:>6} {k:>5} {kernel:>9.2f} {floor:>8.2f} {100 * floor / kernel:>6.0f}%"
    cells += f" {unfused:>13.2f} {unfused / kernel:>5.1f} {cublas:>11.2f} {cublas / kernel:>5.1f}"
    print(f"{cells} {ort_us:>8.2f} {ort_us / kernel:>6.1f}")
    if search:
        tile, took = sweep(m, n, k, (x, w, s))
        print(f"    best tile {tile}: {took:.2f} us (picked {pick_tile(m, n, k, GROUP)}: {kernel:.2f} us)")


if __name__ == "__main__":
    main()
