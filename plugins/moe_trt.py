"""The TensorRT face of llm2trt's MoE op (routed experts, passes/moe.py): a `tensorrt.plugin`
plugin (full TensorRT >= 10.10) that runs the CUDA library's kernels (plugins/csrc/moe.cu).

The ONNX parser maps a node to it by op type `MoE` and the node's domain `llm2trt` (the plugin
namespace). Unlike Int4GroupGemm's, its kernel is not compiled ahead of time: an ahead-of-time
plugin launches exactly one kernel, and MoE is several (gate/up, then Down; a routing pass and a
combine for more than one row). So the implementation runs at enqueue, in Python: it calls the
library's C entry `Llm2trtMoE` (its GEMV paths: no cuBLAS handle, no host synchronization, so it
can be captured in a CUDA graph) on TensorRT's stream. An engine holding it needs Python, llm2trt
and nvcc (the library builds on first use) where it runs: not trtexec.

TensorRT-RTX cannot host plugin layers (it aborts on a Python plugin: docs/facts.md): there the
build inlines the op's local function, the reference body, and `register_tensorrt` refuses with
one line if asked. Never run by the test suite: it needs full TensorRT and a GPU.
No `from __future__ import annotations` in this module: `tensorrt.plugin` reads the decorated
functions' annotations as objects.
"""

import ctypes
import functools
import importlib.util
from typing import Any

from llm2trt.core.errors import BackendError
from llm2trt.plugins import DOMAIN, PluginSpec, register_plugin

NAME = "MoE"
VERSION = 1
PLUGIN_ID = f"{DOMAIN}::{NAME}"
# X, GateUp, Down and Y share one float type; ids are int64, the routing weights float32.
TYPES = "FP16|BF16|FP32, INT64, FP32, FP16|BF16|FP32, FP16|BF16|FP32, FP16|BF16|FP32"


def element_type(trt: Any, dtype: Any) -> int:
    """ONNX's element type code of a TensorRT data type, as the library's C entry takes it."""
    codes = {trt.DataType.HALF: 10, trt.DataType.BF16: 16, trt.DataType.FLOAT: 1}
    if dtype not in codes:
        raise BackendError(f"{NAME}'s TensorRT plugin takes float16, bfloat16 or float32, not {dtype}")
    return codes[dtype]


@functools.cache
def _library() -> ctypes.CDLL:
    """llm2trt's CUDA library for this GPU (built on first use), its MoE entry points typed."""
    from llm2trt.plugins import ort_library

    lib = ctypes.CDLL(str(ort_library.library(ort_library.device_arch())))
    lib.Llm2trtMoEWorkspace.restype = ctypes.c_size_t
    lib.Llm2trtMoEWorkspace.argtypes = [ctypes.c_int, *[ctypes.c_int64] * 5]
    lib.Llm2trtMoE.restype = ctypes.c_int
    lib.Llm2trtMoE.argtypes = [
        ctypes.c_int,
        *[ctypes.c_void_p] * 6,  # X, ExpertIds, ExpertWeights, GateUp, Down, Y
        *[ctypes.c_int64] * 6,  # rows, k, experts, hidden, intermediate, first_expert
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    return lib


_WORKSPACES: dict[int, Any] = {}  # device -> a torch byte buffer, grown, never freed


def _workspace(size: int) -> Any:
    """Scratch for the kernels, kept for the process's life: freeing it could hand memory still in
    use on TensorRT's stream to another allocation, and a captured CUDA graph keeps its address."""
    import torch

    device = torch.cuda.current_device()
    held = _WORKSPACES.get(device)
    if held is None or held.numel() < size:
        held = _WORKSPACES[device] = torch.empty(max(size, 256), dtype=torch.uint8, device=f"cuda:{device}")
    return held


def enqueue(trt: Any, tensors: list[Any], y: Any, first_expert: int, stream: int) -> None:
    """Run the op on TensorRT's stream: `tensors` are X, ExpertIds, ExpertWeights, GateUp, Down."""
    x, ids, _weights, gate_up, _down = tensors
    rows, hidden = (int(d) for d in tuple(x.shape))
    k = int(tuple(ids.shape)[1])
    experts, two_inter, _hidden = (int(d) for d in tuple(gate_up.shape))
    inter = two_inter // 2
    code = element_type(trt, x.dtype)
    lib = _library()
    size = int(lib.Llm2trtMoEWorkspace(code, rows, k, experts, hidden, inter))
    workspace = _workspace(size)
    pointers = [int(t.data_ptr) for t in tensors]
    status = lib.Llm2trtMoE(
        code, *pointers, int(y.data_ptr), rows, k, experts, hidden, inter, first_expert,
        workspace.data_ptr(), workspace.numel(), stream,
    )  # fmt: skip
    if status != 0:
        raise BackendError(f"{NAME}: the CUDA kernels failed to launch (rows {rows}, k {k}, {experts} experts)")


@functools.cache
def register() -> None:
    """Register the plugin with the imported full TensorRT (once per process)."""

    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def describe(
        x: trtp.TensorDesc,
        ids: trtp.TensorDesc,
        weights: trtp.TensorDesc,
        gate_up: trtp.TensorDesc,
        down: trtp.TensorDesc,
        first_expert: int,
    ) -> trtp.TensorDesc:
        return x.like()  # Y: X's shape and type

    @trtp.autotune(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def combinations(
        x: trtp.TensorDesc,
        ids: trtp.TensorDesc,
        weights: trtp.TensorDesc,
        gate_up: trtp.TensorDesc,
        down: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPES, "LINEAR")]

    @trtp.impl(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def run(
        x: trtp.Tensor,
        ids: trtp.Tensor,
        weights: trtp.Tensor,
        gate_up: trtp.Tensor,
        down: trtp.Tensor,
        first_expert: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        enqueue(trt, [x, ids, weights, gate_up, down], outputs[0], first_expert, stream)

    del describe, combinations, run  # registered: TensorRT holds them


def register_tensorrt(trt: Any) -> None:
    """Register `llm2trt::MoE` with full TensorRT; a clear refusal under TensorRT-RTX, which cannot
    host plugin layers (the build inlines the op's body there instead of calling this)."""
    if getattr(trt, "__name__", "").startswith("tensorrt_rtx"):
        raise BackendError(
            f"{NAME}'s TensorRT plugin needs full TensorRT: TensorRT-RTX cannot host plugin layers "
            "(its builds inline the op's reference body)"
        )
    if importlib.util.find_spec("tensorrt.plugin") is None:
        raise BackendError(f"{NAME}'s TensorRT plugin needs tensorrt.plugin (full TensorRT >= 10.10)")
    register()


def kernel_available() -> bool:
    """A CUDA GPU and nvcc: the library's kernels can be built and run here."""
    from llm2trt.plugins import ort_library

    if ort_library.nvcc() is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _function(opset: int) -> Any:
    from llm2trt.passes.moe import moe_function

    return moe_function(opset)


SPEC = register_plugin(
    PluginSpec(
        NAME,
        VERSION,
        __name__,
        register_tensorrt,
        kernel_available=kernel_available,
        summary="routed experts (SwiGLU experts mixed by the router's weights), from the MoE exporters",
        matches="nothing: the MoE exporters write the op themselves",
        function=_function,
    )
)
