"""The TensorRT face of Int4GroupGemm: a quickly deployable plugin (`tensorrt.plugin`, full TensorRT
>= 10.10) whose kernel is compiled ahead of time, so engines run without Python (trtexec too).

The ONNX parser maps a node to it by op type `Int4GroupGemm` and the node's domain `llm2trt` (the
plugin namespace; TensorRT >= 10.10 reads it from the domain). Two tactics, timed by TensorRT per
optimization profile: a decode tile (16 rows) and a prefill tile (64 rows).

Never run by the test suite: it needs full TensorRT, and TensorRT-RTX cannot host plugin layers
(docs/facts.md). The Triton compile it drives is tested (tests/test_plugin_int4.py).
No `from __future__ import annotations` in this module: `tensorrt.plugin` reads the decorated
functions' annotations as objects.
"""

import functools
from typing import Any

PLUGIN_ID = "llm2trt::Int4GroupGemm"
DECODE, PREFILL = 1, 2  # tactics: TensorRT times both and keeps the faster per profile


def tile_for(tactic: int, k: int, group: int) -> Any:
    from llm2trt.plugins.int4_gemm_kernel import pick_tile

    return pick_tile(1 if tactic == DECODE else 1024, 1 << 16, k, group)


@functools.cache
def register() -> None:
    """Register the plugin with the imported full TensorRT (once per process)."""

    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def describe(x: trtp.TensorDesc, w: trtp.TensorDesc, s: trtp.TensorDesc, group_size: int) -> trtp.TensorDesc:
        y = x.like()
        y.shape_expr[-1] = w.shape_expr[0]  # [..., K] -> [..., N]
        return y

    @trtp.autotune(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def combinations(
        x: trtp.TensorDesc, w: trtp.TensorDesc, s: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        # x, scales and y share fp16 or bf16; the packed weights are int8.
        return [trtp.AutoTuneCombination("FP16|BF16, INT8, FP16|BF16, FP16|BF16", "LINEAR", [DECODE, PREFILL])]

    @trtp.aot_impl(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def compile_kernel(
        x: trtp.TensorDesc,
        w: trtp.TensorDesc,
        s: trtp.TensorDesc,
        group_size: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        from llm2trt.core.dtypes import DType
        from llm2trt.plugins.int4_gemm_kernel import compile_ptx

        n, k = int(w.shape_expr[0].constant_value), 2 * int(w.shape_expr[1].constant_value)
        tile = tile_for(tactic, k, group_size)
        compiled = compile_ptx(DType.parse(x.dtype), group_size, tile)  # for the GPU this build runs on
        m = x.shape_expr.numel() // k
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n, tile.block_n)
        launch.grid_y = trtp.cdiv(m, tile.block_m)
        launch.block_x = compiled.threads
        launch.shared_mem = compiled.shared_bytes
        scalars = trtp.SymIntExprs(3)  # the kernel's M, N, K, between its inputs and its output
        scalars[0] = trtp.SymInt32(m)
        scalars[1] = trtp.SymInt32(n)
        scalars[2] = trtp.SymInt32(k)
        return compiled.name, compiled.ptx, launch, scalars

    del describe, combinations, compile_kernel, trt  # registered: TensorRT holds them
