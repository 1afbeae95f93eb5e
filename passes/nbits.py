"""Quantized linear weights as the fast CUDA form reads them.

The quantization pass (and a pre-quantized import) writes a linear layer's weight in the standard
Q/DQ form, `DequantizeLinear(codes, scale[, zero point])` feeding the MatMul: INT8 per output
channel (axis 1) or INT4/INT8 in blocks of input channels (axis 0, block_size). That is what
TensorRT fuses. llm2trt's CUDA ops (`--kv-form gqa`) take the same numbers laid out for a GEMV
instead: a row per output, codes as uint8 (two INT4 codes a byte), scales and zero points per
block (`passes/ort_op_table.py`, the NBits ops). This module reads the first form and writes the
second, exactly: a signed code q becomes q + 8 (INT4) or q + 128 (INT8) with that zero point, so
(code - zero point) * scale is the DequantizeLinear's value bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.passes.manager import Model, read_values
from llm2trt.passes.ort_op_table import NBITS_ZERO

_CODES = {DType.INT4: 4, DType.INT8: 8}  # signed codes, and the unsigned twins below
_UNSIGNED = {"uint4": 4, "uint8": 8}


def pack_nbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., K] (each < 2**bits) as an NBits op's W: 8 / bits codes a byte, low bits first."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack_nbits(w: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_nbits`: uint8 codes [..., K]."""
    w = np.asarray(w, np.uint8)
    if bits == 8:
        return w
    return np.stack([w & 15, w >> 4], axis=-1).reshape(*w.shape[:-1], -1)


@dataclass(frozen=True)
class NBitsWeight:
    """A MatMul's [K, N] weight as (code - zero) * scale, in the GEMV layout: codes uint8 [N, K]
    (unpacked), scales [N, K / block], zeros uint8 [N, K / block]."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block: int

    @property
    def packed(self) -> np.ndarray:
        return pack_nbits(self.codes, self.bits)

    def dequantized(self) -> np.ndarray:
        """[N, K] in float32 (tests, checks)."""
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, -1, self.block).astype(np.float32) - self.zeros[..., None]
        return np.asarray((blocks * self.scales.astype(np.float32)[..., None]).reshape(n, k))


def dequantize_node(weight: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear making a MatMul's weight from constants, if that is how it is made."""
    producer = weight.inputs[0] if isinstance(weight, gs.Variable) and len(weight.inputs) == 1 else None
    if producer is None or producer.op != "DequantizeLinear" or not producer.inputs:
        return None
    if not all(isinstance(t, gs.Constant) for t in producer.inputs if not t.is_empty()):
        return None
    return producer


def refusal(weight: gs.Tensor) -> str:
    """Why a DequantizeLinear weight has no NBits form ('' when it has one, or is no such weight)."""
    node = dequantize_node(weight)
    if node is None:
        return ""
    codes = node.inputs[0]
    name = np.dtype(codes.dtype).name if codes.dtype is not None else "?"
    if len(codes.shape) != 2:
        return "a quantized weight that is not 2-D"
    if DType.find(codes.dtype) not in _CODES and name not in _UNSIGNED:
        return f"a {name} weight (the CUDA ops take INT4 and INT8 codes)"
    axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
    if not (axis in (1, -1) and block == 0) and not (axis == 0 and block > 0):
        return "a quantized weight neither per output channel nor in blocks of input channels"
    scale = node.inputs[1]
    if DType.find(scale.dtype) not in (DType.FP16, DType.FP32):
        return "a quantized weight whose scales are not float16/float32"
    return ""


def nbits_weight(weight: gs.Tensor) -> NBitsWeight | None:
    """The NBits form of a MatMul's weight made by DequantizeLinear of constants (None when it is
    not one, or `refusal` names why it has no such form)."""
    node = dequantize_node(weight)
    if node is None or refusal(weight):
        return None
    raw = read_values(node.inputs[0])
    name = raw.dtype.name
    signed = DType.find(raw.dtype)
    bits = _UNSIGNED.get(name) or (_CODES[signed] if signed is not None else 0)
    offset = 0 if name in _UNSIGNED else NBITS_ZERO[bits]
    k, n = raw.shape
    codes = np.ascontiguousarray((raw.astype(np.int16) + offset).astype(np.uint8).T)  # [N, K]
    scale = read_values(node.inputs[1])
    zero_input = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    zero = read_values(zero_input).astype(np.int16) + offset if zero_input is not None else None
    if int(node.attrs.get("block_size", 0)) == 0:  # per output channel: one block a row
        block = k
        scales = scale.reshape(n, 1)
        zeros = np.full((n, 1), offset, np.int16) if zero is None else zero.reshape(n, 1)
    else:
        block = int(node.attrs["block_size"])
        scales = np.ascontiguousarray(scale.T)  # [K / B, N] -> [N, K / B]
        zeros = np.full(scales.shape, offset, np.int16) if zero is None else np.ascontiguousarray(zero.T)
    return NBitsWeight(codes, np.ascontiguousarray(scales), zeros.astype(np.uint8), bits, block)


def stacked(weights: list[NBitsWeight]) -> NBitsWeight | None:
    """Weights of one input stacked along the outputs (gate and up), or None if their codes or
    blocks differ."""
    first = weights[0]
    if any(w.bits != first.bits or w.block != first.block or w.scales.dtype != first.scales.dtype for w in weights):
        return None
    return NBitsWeight(
        np.concatenate([w.codes for w in weights]),
        np.concatenate([w.scales for w in weights]),
        np.concatenate([w.zeros for w in weights]),
        first.bits,
        first.block,
    )


def concatenated(model: Model, weights: list[gs.Tensor], name: str) -> gs.Variable | None:
    """One DequantizeLinear for MatMul weights [K, N_i] of one input, their outputs side by side
    (q, k and v packed), or None where they are not alike (codes, axis, block, types)."""
    nodes = [dequantize_node(w) for w in weights]
    if any(node is None or refusal(w) for node, w in zip(nodes, weights, strict=True)):
        return None
    found = [n for n in nodes if n is not None]
    first = found[0]
    if any(n.attrs != first.attrs or len(n.inputs) != len(first.inputs) for n in found):
        return None
    parts = [[read_values(t) for t in n.inputs if not t.is_empty()] for n in found]
    if any(len({p[i].dtype for p in parts}) != 1 for i in range(len(parts[0]))):
        return None
    joined = []
    for i, _ in enumerate(parts[0]):
        axis = 1 if parts[0][i].ndim == 2 else 0  # codes and block scales [K(/B), N]; channel scales [N]
        joined.append(np.concatenate([p[i] for p in parts], axis=axis))
    roles = ("codes", "scale", "zero")[: len(joined)]
    inputs = [model.constant(model.fresh_name(f"{name}_{r}"), v) for r, v in zip(roles, joined, strict=True)]
    shape = [int(joined[0].shape[0]), int(joined[0].shape[1])]
    out = gs.Variable(model.fresh_name(f"{name}_dequantized"), dtype=weights[0].dtype, shape=shape)
    node = gs.Node("DequantizeLinear", model.fresh_name(f"{name}_dq"), dict(first.attrs), inputs, [out])
    model.graph.nodes.append(node)
    return out
