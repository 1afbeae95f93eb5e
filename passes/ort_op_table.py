"""The op table of llm2trt's ONNX Runtime custom ops: each op's name, inputs, outputs, types and
attributes, written once.

passes/ort_ops.py reads it (the rewrite pass, the reference bodies); plugins/ort_library.py turns it
into the C++ header `llm2trt_ops.h` that the CUDA library's registration is compiled against, so the
nodes the pass writes and the ops the library registers cannot drift apart. Plain data: importing it
loads nothing else.

Types: the library registers each op once per element type T (float16 and float32, and bfloat16
for a `bfloat16` op); an input or output has type T unless the op names it in `int32_inputs`,
`int64_inputs`, `float32_inputs` or `uint8_inputs`, or it is Y of a `float_y` op (float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DOMAIN = "llm2trt"
VERSION = 1

# Element-type tags: "T" is the op's element type (its fp16 or its fp32 registration); I32, I64,
# F32, U8 and I8 are fixed.
ElementType = Literal["T", "I32", "I64", "F32", "U8", "I8"]


@dataclass(frozen=True)
class KernelOp:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[str, ...] = ()  # each typed in ATTRIBUTE_TYPES
    float_y: bool = False  # Y in float32 whatever the inputs' type
    int32_inputs: tuple[str, ...] = ()
    int64_inputs: tuple[str, ...] = ()
    float32_inputs: tuple[str, ...] = ()  # float32 whatever T is
    uint8_inputs: tuple[str, ...] = ()  # uint8 whatever T is (quantized weights' codes and zero points)
    int8_io: tuple[str, ...] = ()  # inputs and outputs in int8 whatever T is (an INT8 KV cache)
    host_inputs: tuple[str, ...] = ()  # read on the host: ONNX Runtime hands them over in CPU memory
    optional_outputs: tuple[str, ...] = ()  # written only where the node names them
    bfloat16: bool = False  # registered for bfloat16 too (its kernels have a bfloat16 instance)

    def input_type(self, name: str) -> ElementType:
        if name in self.int32_inputs:
            return "I32"
        if name in self.int64_inputs:
            return "I64"
        if name in self.uint8_inputs:
            return "U8"
        if name in self.int8_io:
            return "I8"
        return "F32" if name in self.float32_inputs else "T"

    def output_type(self, name: str) -> ElementType:
        if name in self.int8_io:
            return "I8"
        return "F32" if self.float_y and name == "Y" else "T"


ATTRIBUTE_TYPES: dict[str, type[float] | type[int]] = {
    "epsilon": float,
    "num_heads": int,
    "kv_num_heads": int,
    "scale": float,
    "do_rotary": int,
    "rotary_interleaved": int,
    "local_window_size": int,
    "first_expert": int,
    "bits": int,
    "block_size": int,
}


def _gemv(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], float_y: bool = False) -> KernelOp:
    """A norm + GEMV op: epsilon where it normalizes; only Y is always written (the one-row kernel
    writes no Normed or GateUp, and Sum only where the node names it)."""
    epsilon = ("epsilon",) if "Gamma" in inputs else ()
    return KernelOp(name, inputs, outputs, epsilon, float_y, optional_outputs=outputs[1:])


def _nbits(op: KernelOp) -> KernelOp:
    """The op with a quantized W (weight-only INT4 or INT8): W is uint8 codes [N, K * bits / 8]
    (bits 4: two codes a byte, the even k in the low nibble), Scales T [N, K / block_size] and
    ZeroPoints uint8 [N, K / block_size], one code each; w = (code - zero point) * scale. A
    symmetric weight has zero points 8 (INT4) or 128 (INT8), its signed codes stored offset by them."""
    base = op.name.removesuffix("F32")
    name = f"{base}NBits{'F32' if op.float_y else ''}"
    return KernelOp(
        name,
        (*op.inputs, "Scales", "ZeroPoints"),
        op.outputs,
        (*op.attributes, "bits", "block_size"),
        op.float_y,
        uint8_inputs=("W", "ZeroPoints"),
        optional_outputs=op.optional_outputs,
    )


_FLOAT_OPS = (
    _gemv("Linear", ("X", "W"), ("Y",)),
    _gemv("RMSNormLinear", ("X", "Gamma", "W"), ("Y", "Normed")),
    _gemv("SkipRMSNormLinear", ("X", "Skip", "Gamma", "W"), ("Y", "Sum", "Normed")),
    _gemv("SkipRMSNormSwiGLU", ("X", "Skip", "Gamma", "W"), ("Y", "Sum", "Normed", "GateUp")),
    _gemv("LinearF32", ("X", "W"), ("Y",), float_y=True),
    _gemv("RMSNormLinearF32", ("X", "Gamma", "W"), ("Y", "Normed"), float_y=True),
    _gemv("SkipRMSNormLinearF32", ("X", "Skip", "Gamma", "W"), ("Y", "Sum", "Normed"), float_y=True),
)
OPS: dict[str, KernelOp] = {op.name: op for op in (*_FLOAT_OPS, *map(_nbits, _FLOAT_OPS))}
NBITS = (4, 8)  # the code widths the quantized ops take
NBITS_ZERO = {4: 8, 8: 128}  # a symmetric weight's zero point: its signed codes offset into uint8

ATTENTION = KernelOp(
    "GroupQueryAttention",
    ("QKV", "PastKey", "PastValue", "SeqlensK", "TotalSequenceLength", "CosCache", "SinCache"),
    ("Output", "PresentKey", "PresentValue"),
    ("num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size"),
    int32_inputs=("SeqlensK", "TotalSequenceLength"),
    host_inputs=("TotalSequenceLength",),  # it sizes the launch, as in ONNX Runtime's own op
)
# The same with a per-head RMSNorm on the queries and keys before the rotation (QK-norm: Qwen3,
# Gemma 3): QNorm and KNorm are the norms' scales over head_dim, epsilon theirs.
ATTENTION_QK_NORM = KernelOp(
    "GroupQueryAttentionQKNorm",
    (*ATTENTION.inputs, "QNorm", "KNorm"),
    ATTENTION.outputs,
    (*ATTENTION.attributes, "epsilon"),
    int32_inputs=ATTENTION.int32_inputs,
    host_inputs=ATTENTION.host_inputs,
)


# The same two with an INT8 cache: PastKey/PastValue and PresentKey/PresentValue int8, entry
# (head h, slot s, channel d) = round(value / scale[h, d]) clipped to +-127, KScale and VScale
# float32 [kv_heads, head_dim], one static scale a channel (calibrated). Keys are stored rotated, as
# in the float cache. Half the bytes of a float16 cache to read each step.
def _int8_cache(op: KernelOp) -> KernelOp:
    return KernelOp(
        f"{op.name}Int8KV",
        (*op.inputs, "KScale", "VScale"),
        op.outputs,
        op.attributes,
        int32_inputs=op.int32_inputs,
        float32_inputs=("KScale", "VScale"),
        host_inputs=op.host_inputs,
        int8_io=("PastKey", "PastValue", "PresentKey", "PresentValue"),
    )


ATTENTION_INT8 = _int8_cache(ATTENTION)
ATTENTION_QK_NORM_INT8 = _int8_cache(ATTENTION_QK_NORM)
ATTENTIONS = (ATTENTION, ATTENTION_QK_NORM, ATTENTION_INT8, ATTENTION_QK_NORM_INT8)
INT8_CACHE = {ATTENTION.name: ATTENTION_INT8, ATTENTION_QK_NORM.name: ATTENTION_QK_NORM_INT8}  # float -> INT8 twin
KV_INT8_MAX = 127  # an INT8 cache entry's largest code
# Routed experts (Mixtral, Qwen3-MoE, Qwen2-MoE): Y[n] = sum over j of ExpertWeights[n, j] *
# Down[e] @ (silu(Gate[e] @ X[n]) * (Up[e] @ X[n])), e = ExpertIds[n, j]. GateUp is [E, 2I, H] (an
# expert's gate rows, then its up rows), Down [E, H, I]; X and Y are [N, H]. The router (softmax,
# top-k, renormalization) stays in the graph as the model computes it, so one op serves every
# routing rule. `first_expert` is the global id of GateUp's first expert (expert parallelism: a
# rank holds a contiguous block; ids outside it add nothing).
MOE = KernelOp(
    "MoE",
    ("X", "ExpertIds", "ExpertWeights", "GateUp", "Down"),
    ("Y",),
    ("first_expert",),
    int64_inputs=("ExpertIds",),
    float32_inputs=("ExpertWeights",),
    bfloat16=True,
)
ATTENTION_HEAD_SIZES = (16, 32, 64, 128, 256)  # the library's kernels: 8 elements a lane, a head within a warp
*_smaller, _largest = ATTENTION_HEAD_SIZES
ATTENTION_HEAD_SIZES_TEXT = f"{', '.join(str(size) for size in _smaller)} or {_largest}"  # for messages
ATTENTION_MAX_GROUP = 8  # query heads a KV head, at most (the decode kernel keeps them in registers)

# Every op, in the library's registration order.
ALL: tuple[KernelOp, ...] = (*OPS.values(), *ATTENTIONS, MOE)
