"""Asymmetric 4-bit weights in a form TensorRT builds, with the same numbers.

TensorRT refuses a DequantizeLinear with a non-zero zero point. An imported asymmetric checkpoint
(GPTQ sym=false, AWQ, compressed-tensors asymmetric) holds W = (u - z) * s, u and z unsigned 4-bit,
per block of G input channels. Split at the midpoint 8:

    x @ ((u - z) * s) = x @ ((u - 8) * s) + xs @ ((8 - z) * s)

where xs [.., K/G] are the sums of x over each block. The first term is a symmetric INT4
DequantizeLinear (u - 8 fits INT4) feeding the MatMul, which TensorRT fuses; the second is a small
float32 MatMul of the block sums (`x @ B`, B the [K, K/G] 0/1 block indicator) with the [K/G, N]
matrix (8 - z) * s, itself exact in float32 (a 5-bit integer times a 16-bit float). `build` runs this
on a copy of the graph; the artifact keeps the exact form ONNX Runtime reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.artifact import save_onnx
from llm2trt.core.dtypes import DType
from llm2trt.passes.manager import GraphPass, Model, PassManager, PassResult, read_values

MIDPOINT = 8
_UINT4 = onnx.TensorProto.UINT4


def _is_uint4(tensor: gs.Tensor) -> bool:
    """A constant of UINT4 values (onnx-graphsurgeon has no name for the type: its ONNX proto does)."""
    if not isinstance(tensor, gs.Constant):
        return False
    proto = getattr(tensor._values, "tensor", None)
    if proto is not None:
        return int(proto.data_type) == _UINT4
    return DType.find(np.asarray(tensor._values).dtype) is DType.UINT4


def zero_point_weights(proto: onnx.ModelProto) -> int:
    """DequantizeLinear nodes of UINT4 constant codes (with or without a zero point): the ones to rewrite."""
    inits = {t.name: t for t in proto.graph.initializer}
    return sum(
        1
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == _UINT4
    )


class ZeroPointsForTensorRT(GraphPass):
    """Each UINT4 weight DequantizeLinear -> INT4 codes u - 8 without a zero point, plus the block sums
    of each reading MatMul's input times (8 - z) * s, added to its output."""

    name = "zero_points_for_tensorrt"

    def run(self, model: Model) -> PassResult:
        sums: dict[tuple[str, int, int], gs.Variable] = {}
        indicators: dict[tuple[int, int], gs.Constant] = {}
        counts = {"weights": 0, "corrections": 0}
        for dq in [n for n in model.graph.nodes if n.op == "DequantizeLinear" and _is_uint4(n.inputs[0])]:
            readers = list(dq.outputs[0].outputs)
            if not readers or any(r.op != "MatMul" or r.inputs[1] is not dq.outputs[0] for r in readers):
                continue  # only the weight of a MatMul has this form
            codes = read_values(dq.inputs[0]).astype(np.int16)
            k, n = codes.shape
            block = int(dq.attrs.get("block_size", 0)) or k  # per-channel (axis 1, no block): one block of K
            has_zero = len(dq.inputs) > 2 and not dq.inputs[2].is_empty()
            zeros = read_values(dq.inputs[2]).astype(np.int16) if has_zero else np.zeros((k // block, n), np.int16)
            scale_tensor = dq.inputs[1]
            scales = read_values(scale_tensor).astype(np.float32).reshape(k // block, n)
            dq.inputs[0] = model.constant(
                model.fresh_name(f"{dq.inputs[0].name}_int4"),
                (codes - MIDPOINT).astype(np.int8).astype(DType.INT4.numpy),
            )
            while len(dq.inputs) > 2:
                dq.inputs.pop()
            if block == k:
                dq.attrs = {"axis": 1}
            counts["weights"] += 1
            offset = (MIDPOINT - zeros).astype(np.float32) * scales  # exact: |8 - z| <= 8 times a 16-bit float
            if not offset.any():
                continue
            correction = gs.Constant(model.fresh_name(f"{dq.name}_zero_point_correction"), offset)
            for matmul in readers:
                x = matmul.inputs[0]
                xs = self._block_sums(model, x, k, block, sums, indicators)
                self._add_correction(model, matmul, xs, correction)
                counts["corrections"] += 1
        return PassResult(counts["weights"] > 0, counts)

    @staticmethod
    def _block_sums(
        model: Model,
        x: gs.Variable,
        k: int,
        block: int,
        sums: dict[tuple[str, int, int], gs.Variable],
        indicators: dict[tuple[int, int], gs.Constant],
    ) -> gs.Variable:
        """x's sums over each block of input channels in float32 (one per input and block size: q/k/v share it)."""
        key = (x.name, k, block)
        if key in sums:
            return sums[key]
        if (k, block) not in indicators:
            ones = (np.arange(k)[:, None] // block == np.arange(k // block)[None, :]).astype(np.float32)
            indicators[(k, block)] = gs.Constant(model.fresh_name(f"block_indicator_{k}x{k // block}"), ones)
        wide = x
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            wide = gs.Variable(model.fresh_name(f"{x.name}_float32"), dtype=np.float32)
            model.graph.nodes.append(
                gs.Node("Cast", model.fresh_name(f"{x.name}_to_float32"), {"to": DType.FP32.onnx}, [x], [wide])
            )
        out = gs.Variable(model.fresh_name(f"{x.name}_block_sums"), dtype=np.float32)
        model.graph.nodes.append(
            gs.Node(
                "MatMul", model.fresh_name(f"{x.name}_block_sums"), inputs=[wide, indicators[(k, block)]], outputs=[out]
            )
        )
        sums[key] = out
        return out

    @staticmethod
    def _add_correction(model: Model, matmul: gs.Node, xs: gs.Variable, correction: gs.Constant) -> None:
        """matmul's output += xs @ correction (computed in float32, cast back to the output's type)."""
        y = matmul.outputs[0]
        main = gs.Variable(model.fresh_name(f"{y.name}_symmetric"), dtype=y.dtype, shape=y.shape)
        matmul.outputs[0] = main
        extra = gs.Variable(model.fresh_name(f"{y.name}_zero_points"), dtype=np.float32)
        nodes = [
            gs.Node("MatMul", model.fresh_name(f"{matmul.name}_zero_points"), inputs=[xs, correction], outputs=[extra])
        ]
        if y.dtype is not None and np.dtype(y.dtype) != np.float32:
            narrow = gs.Variable(model.fresh_name(f"{y.name}_zero_points_cast"), dtype=y.dtype)
            to = DType.parse(y.dtype).onnx
            nodes.append(
                gs.Node("Cast", model.fresh_name(f"{matmul.name}_zero_points_cast"), {"to": to}, [extra], [narrow])
            )
            extra = narrow
        nodes.append(
            gs.Node("Add", model.fresh_name(f"{matmul.name}_zero_points_add"), inputs=[main, extra], outputs=[y])
        )
        model.graph.nodes += nodes


def tensorrt_form(proto: onnx.ModelProto, weights_dir: Path, out_dir: Path) -> Path:
    """`proto` (loaded without its weights, which live in `weights_dir`) with its zero-point weights
    rewritten, written with its weights into `out_dir`; the path of the ONNX file."""
    model = Model.from_onnx(proto, weights_dir)
    result = PassManager([ZeroPointsForTensorRT()]).run(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    rewritten = result.model.to_onnx()
    rewritten.graph.ClearField("value_info")  # the MatMuls' outputs moved: let the parser infer them
    save_onnx(rewritten, out_dir, source=weights_dir)
    return out_dir / "model.onnx"
