"""Int4GroupGemm: y = x @ dequant(W)^T with W in signed INT4, one scale per `group_size` inputs.

Why this plugin (docs/facts.md, "Decode peers"): batch-1 decode reads every weight once
per token, so its speed is weight bytes over memory bandwidth. INT4 weights are a quarter of fp16's
bytes, but only a kernel that reads them packed and dequantizes in registers gets that: ONNX
Runtime CUDA runs the reference body as a chain of elementwise kernels per call (measured 28-54x
slower than this kernel, README), and TensorRT-RTX builds the inlined body as thousands of layers
(SmolLM2-135M: 11,143). NVIDIA's edge LLM stack ships the same op as a plugin.

The three faces:
- the ONNX op `llm2trt::Int4GroupGemm(X, W, S)` (version 1, attribute `group_size`), with a
  local-function body of standard ops: the reference that ONNX Runtime runs and TensorRT inlines
  when no plugin of this name is registered;
- a TensorRT plugin of the same name (`tensorrt.plugin`, TensorRT >= 10.10) whose kernel is
  compiled ahead of time, so the engine runs without Python;
- the Triton kernel (`llm2trt.plugins.int4_gemm_kernel`), tested on the GPU against the reference.

Layout: X [..., K] fp16/bf16/fp32; W int8 [N, K/2], two weights per byte along K (even k in the low
nibble, odd k in the high one, each a two's-complement nibble); S [N, K/group_size] in X's type.
int8 rather than ONNX's int4 type because TensorRT plugins take INT8 tensors and not INT4 ones.

`optimize --plugin Int4GroupGemm` rewrites `MatMul(X, DequantizeLinear(Wq int4 [K, N], S [K/G, N],
axis=0, block_size=G))`, what `optimize --quant int4-awq|int4-rtn` writes, into the op.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

import numpy as np

from llm2trt.plugins import DOMAIN, PluginSpec, register_plugin

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from llm2trt.passes.manager import Model
    from llm2trt.passes.pattern import Match, RewriteRule

NAME = "Int4GroupGemm"
VERSION = 1
MIN_GROUP = 16  # the kernel's smallest tile along K (tensor-core dot)


# -- weights ---------------------------------------------------------------------------------


def pack(q: np.ndarray) -> np.ndarray:
    """int4 values [N, K] (in -8..7, K even) -> int8 [N, K/2]: even k low nibble, odd k high."""
    q = q.astype(np.int16)
    if q.shape[-1] % 2 or q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("pack needs int4 values in -8..7 and an even K")
    lo, hi = q[..., 0::2] & 0xF, q[..., 1::2] & 0xF
    return (lo | (hi << 4)).astype(np.uint8).view(np.int8)


def unpack(w: np.ndarray) -> np.ndarray:
    """int8 [N, K/2] -> int4 values [N, K] as int8 (the inverse of `pack`)."""
    b = w.view(np.int8).astype(np.int16)
    lo = ((b & 0xF) ^ 8) - 8
    hi = b >> 4  # arithmetic shift: the high nibble's sign
    return np.stack([lo, hi], axis=-1).reshape(*w.shape[:-1], -1).astype(np.int8)


def reference(x: np.ndarray, w: np.ndarray, s: np.ndarray, group_size: int) -> np.ndarray:
    """The op in NumPy (float64 accumulation): what every face is tested against."""
    q = unpack(w).astype(np.float64)
    n, k = q.shape
    dense = (q.reshape(n, k // group_size, group_size) * s.astype(np.float64)[..., None]).reshape(n, k)
    return (x.astype(np.float64) @ dense.T).astype(x.dtype)


# -- the ONNX op and its reference body --------------------------------------------------------


def function(opset: int) -> gs.Function:
    """The op's local function: the bytes through DequantizeLinear (TensorRT takes an int8 constant
    only into a DequantizeLinear or a plugin, measured), nibbles split with float arithmetic that is
    exact on these small integers, scaled per group, then MatMul.

    A byte b is hi * 16 + lo_u with hi the signed high nibble and lo_u in 0..15: hi = floor(b / 16),
    lo_u = b - 16 hi, and the signed low nibble is lo_u - 16 floor(lo_u / 8).
    """
    import onnx_graphsurgeon as gs

    x = gs.Variable("X")
    w = gs.Variable("W")
    s = gs.Variable("S")
    y = gs.Variable("Y")
    nodes: list[gs.Node] = []

    def op(kind: str, *inputs: gs.Tensor, **attrs: Any) -> gs.Variable:
        out = gs.Variable(f"t{len(nodes)}")
        nodes.append(gs.Node(kind, inputs=list(inputs), outputs=[out], attrs=attrs))
        return out

    def const(name: str, value: Any, dtype: Any = np.float32) -> gs.Constant:
        return gs.Constant(f"{NAME}_{name}", np.array(value, dtype=dtype))

    sixteen, eight = const("16", 16.0), const("8", 8.0)
    b = op("DequantizeLinear", w, const("one", 1.0), const("zero", 0, np.int8))
    hi = op("Floor", op("Div", b, sixteen))
    lo_u = op("Sub", b, op("Mul", hi, sixteen))
    lo = op("Sub", lo_u, op("Mul", op("Floor", op("Div", lo_u, eight)), sixteen))
    last = const("last", [-1], np.int64)
    pairs = op("Concat", op("Unsqueeze", lo, last), op("Unsqueeze", hi, last), axis=-1)  # [N, K/2, 2]
    values = op("CastLike", pairs, s)
    groups = op("Concat", op("Shape", s), last, axis=0)  # [N, K/G, -1]: G weights per scale
    scaled = op("Mul", op("Reshape", values, groups), op("Unsqueeze", s, last))
    dense = op("Reshape", scaled, op("Concat", op("Shape", w, end=1), last, axis=0))  # [N, K]
    nodes.append(gs.Node("MatMul", inputs=[x, op("Transpose", dense)], outputs=[y]))
    return gs.Function(
        NAME, domain=DOMAIN, nodes=nodes, inputs=[x, w, s], outputs=[y], opset=opset, attrs={"group_size": None}
    )


def make_node(x: gs.Tensor, w: gs.Constant, s: gs.Constant, group_size: int, out: gs.Variable, name: str) -> gs.Node:
    import onnx_graphsurgeon as gs

    return gs.Node(NAME, name=name, domain=DOMAIN, inputs=[x, w, s], outputs=[out], attrs={"group_size": group_size})


# -- the rewrite: INT4 block-quantized MatMul -> the op ------------------------------------------


def _is_int4(tensor: Any) -> bool:
    from llm2trt.core.dtypes import DType

    return tensor.dtype is not None and DType.find(tensor.dtype) is DType.INT4


@functools.cache
def _rule_class() -> type[RewriteRule]:
    """Built on first use: the build worker imports this module, and needs no pattern language."""
    from llm2trt.passes.pattern import Const, Op, RewriteRule, Var

    class Int4MatMulRule(RewriteRule):
        name = "int4_matmul_to_plugin"
        fusion = NAME
        emits = NAME
        root = ("MatMul",)
        anchor = ("DequantizeLinear",)
        anchor_depth = 1

        def pattern(self) -> Any:
            dq = Op(
                "DequantizeLinear",
                Const("wq"),
                Const("scale"),
                name="dq",
                attrs={"axis": lambda a: a in (0, -2), "block_size": bool},
            )
            return Op("MatMul", Var("x"), dq)

        def check(self, m: Match, model: Model) -> str | None:
            wq, scale = m.tensors["wq"], m.tensors["scale"]
            group = int(m.nodes["dq"].attrs["block_size"])
            if not _is_int4(wq):
                return f"the weight {wq.name!r} is {wq.dtype}, not int4"
            if len(wq.shape) != 2:
                return f"the weight {wq.name!r} is not a matrix"
            k = int(wq.shape[0])
            if group < MIN_GROUP or group & (group - 1) or k % group:
                return f"group size {group} must be a power of two >= {MIN_GROUP} dividing K={k}"
            if m.tensors["x"].dtype is not None and np.dtype(scale.dtype) != np.dtype(m.tensors["x"].dtype):
                return f"the scale {scale.name!r} is {scale.dtype}, the input {m.tensors['x'].dtype}"
            return None

        def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
            import onnx_graphsurgeon as gs

            from llm2trt.passes.qdq import constant

            wq, scale = m.tensors["wq"], m.tensors["scale"]
            q = np.asarray(wq.values).astype(np.int8)  # [K, N]
            w = constant(model, f"{wq.name}_packed", pack(np.ascontiguousarray(q.T)))
            s = gs.Constant(model.fresh_name(f"{scale.name}_by_row"), np.ascontiguousarray(np.asarray(scale.values).T))
            group = int(m.nodes["dq"].attrs["block_size"])
            return [make_node(m.tensors["x"], w, s, group, out, model.fresh_name(f"{m.nodes['dq'].name}_{NAME}"))]

    return Int4MatMulRule


def rules() -> list[RewriteRule]:
    return [_rule_class()()]


# -- TensorRT: the plugin, its kernel compiled ahead of time --------------------------------------


def register_tensorrt(trt: Any) -> None:
    """Register `llm2trt::Int4GroupGemm` with full TensorRT (>= 10.10: the ONNX parser finds a
    plugin by the node's op type and domain). The engine embeds the PTX: no Python at run time."""
    from llm2trt.core.errors import BackendError
    from llm2trt.plugins import int4_gemm_trt

    if importlib.util.find_spec("triton") is None:
        raise BackendError(f"{NAME}'s TensorRT plugin compiles its kernel with Triton: pip install 'llm2trt[kernels]'")

    int4_gemm_trt.register()


def kernel_available() -> bool:
    """Triton and a CUDA GPU: the kernel can run (and be compiled for a TensorRT plugin) here."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


SPEC = register_plugin(
    PluginSpec(
        NAME,
        VERSION,
        __name__,
        register_tensorrt,
        kernel_available=kernel_available,
        summary="INT4 group-wise weight-only GEMM (x @ dequant(W)^T), for batch-1 decode",
        matches="MatMuls whose weight is INT4 block-quantized (optimize --quant int4-awq or int4-rtn)",
        rules=rules,
        function=function,
    )
)
