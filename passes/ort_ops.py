"""llm2trt's own ops for the ONNX Runtime CUDA decoder (`--kv-form gqa`): norm + GEMV (+ SwiGLU).

A batch-1 decode step reads every weight once, in GEMVs that the gqa graph still runs as cuBLAS
calls with a norm or an activation kernel between them (H200, 1.1B shape: GEMVs at ~60% of copy
bandwidth, ~300 kernels a step; README "Decode speed"). These ops fold the norm (and the residual
add before it, and SwiGLU after it) into the GEMV that reads its output, so a layer is four of
them plus GroupQueryAttention:

    Linear(X, W) -> Y                                       Y = X @ W^T
    RMSNormLinear(X, Gamma, W) -> (Y, Normed)               Normed = RMSNorm(X) * Gamma
    SkipRMSNormLinear(X, Skip, Gamma, W) -> (Y, Sum, Normed)          Sum = X + Skip
    SkipRMSNormSwiGLU(X, Skip, Gamma, W) -> (Y, Sum, Normed, GateUp)  Y = silu(gate) * up

and ONNX Runtime's GroupQueryAttention (packed QKV, rotary inside) becomes llm2trt's
`GroupQueryAttention`, the same inputs less the empty key and value, whose body is that node: the
library runs a decode step as one kernel where ONNX Runtime's op takes four (README "Decode speed").

`LinearF32`, `RMSNormLinearF32` and `SkipRMSNormLinearF32` are the first three with Y in float32
from float16 inputs, its accumulator never rounded to float16: the pass uses them where Y is a graph
output (the logits). fp16 logits near 20 are 0.016 apart, coarser than the top-two margins greedy
decoding meets (SmolLM2's five prompts: rounding only the logits to fp16 in an otherwise fp32
transformers run flips two of them); float logits cost 2 extra bytes a vocabulary entry.

W is [N, K], a row per output (the layout a GEMV reads contiguously; a tied lm_head is the
embedding itself), SwiGLU's W is [W_gate; W_up]. Each op is an `llm2trt`-domain local function
whose body (standard ONNX) is the reference: ONNX Runtime runs the body where llm2trt's CUDA
library (plugins/csrc, built on first use) is not registered, and that library's kernel where it
is. Normed and GateUp are what the many-row path (prefill, batched decode) stages between its
kernels; the one-row kernel never writes them. The ops' names, inputs, outputs, types and
attributes are passes/ort_op_table.py's, the table the library's registration is compiled from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.passes.fusions import register_equivalent
from llm2trt.passes.manager import GraphPass, Model, PassResult, read_values
from llm2trt.passes.nbits import (
    NBitsWeight,
    concatenated,
    dequantize_node,
    nbits_weight,
    pack_nbits,
    refusal,
    unpack_nbits,
)
from llm2trt.passes.nbits import stacked as stacked_nbits
from llm2trt.passes.ort_op_table import (
    ALL,
    ATTENTION,
    ATTENTION_HEAD_SIZES,
    ATTENTION_HEAD_SIZES_TEXT,
    ATTENTION_MAX_GROUP,
    ATTENTION_QK_NORM,
    ATTRIBUTE_TYPES,
    DOMAIN,
    INT8_CACHE,
    KV_INT8_MAX,
    MOE,
    OPS,
    VERSION,
    KernelOp,
)
from llm2trt.passes.qdq import transposed_constant

MS = "com.microsoft"
FLOATS = (DType.FP16, DType.FP32)  # what the CUDA library's kernels take
FLOAT_Y = {op.name.removesuffix("F32"): op.name for op in OPS.values() if op.float_y}  # op -> its float-Y twin
ATTENTION_ATTRS = ATTENTION.attributes
ALL_OPS = tuple(op.name for op in ALL if op is not MOE)  # what this pass writes (MoE comes from the export)

register_equivalent("Attention", DOMAIN, ATTENTION.name)
register_equivalent("RoPE", DOMAIN, ATTENTION.name, lambda node: 2)
register_equivalent("Attention", DOMAIN, ATTENTION_QK_NORM.name)
register_equivalent("RoPE", DOMAIN, ATTENTION_QK_NORM.name, lambda node: 2)
register_equivalent("RMSNorm", DOMAIN, ATTENTION_QK_NORM.name, lambda node: 2)  # q_norm, k_norm
for _float_op, _twin in INT8_CACHE.items():  # an INT8 cache's attention counts as its float twin
    register_equivalent("Attention", DOMAIN, _twin.name)
    register_equivalent("RoPE", DOMAIN, _twin.name, lambda node: 2)
    if _float_op == ATTENTION_QK_NORM.name:
        register_equivalent("RMSNorm", DOMAIN, _twin.name, lambda node: 2)

# The norm these ops carry (the expected-fusion gate counts them).
for _op in (op.name for op in OPS.values() if "Gamma" in op.inputs):
    register_equivalent("RMSNorm", DOMAIN, _op)


def attention_function(opset: int) -> gs.Function:
    """llm2trt's GroupQueryAttention: its body is ONNX Runtime's node, key and value empty (packed)."""
    formal = {n: gs.Variable(n) for n in (*ATTENTION.inputs, *ATTENTION.outputs)}
    empty = gs.Variable.empty()
    inputs = [formal["QKV"], empty, empty, *(formal[n] for n in ATTENTION.inputs[1:])]
    attrs = {name: gs.Node.AttributeRef(name, ATTRIBUTE_TYPES[name]) for name in ATTENTION_ATTRS}
    node = gs.Node(
        "GroupQueryAttention", inputs=inputs, outputs=[formal[n] for n in ATTENTION.outputs], attrs=attrs, domain=MS
    )
    return _function(ATTENTION, [node], formal, opset, (MS, 1))


def attention_qk_norm_function(opset: int) -> gs.Function:
    """llm2trt's GroupQueryAttentionQKNorm: QKV split, q and k normalized per head (RMSNormalization
    over head_dim, scales QNorm and KNorm), then ONNX Runtime's GroupQueryAttention on q, k and v."""
    op = ATTENTION_QK_NORM
    formal = {n: gs.Variable(n) for n in (*op.inputs, *op.outputs)}
    nodes: list[gs.Node] = []

    def node(kind: str, inputs: list[gs.Tensor], outputs: int = 1, **attrs: Any) -> list[gs.Variable]:
        outs = [gs.Variable(f"t{len(nodes)}_{i}") for i in range(outputs)]
        nodes.append(gs.Node(kind, inputs=inputs, outputs=outs, attrs=attrs))
        return outs

    def ref(name: str) -> Any:
        return gs.Node.AttributeRef(name, ATTRIBUTE_TYPES[name])

    def const(values: list[int]) -> gs.Variable:
        return node("Constant", [], value_ints=values)[0]

    (head,) = node("Shape", [formal["QNorm"]])  # [D]
    (heads,) = node("Constant", [], value_int=ref("num_heads"))
    (kv_heads,) = node("Constant", [], value_int=ref("kv_num_heads"))
    (q_width,) = node("Mul", [heads, head])
    (kv_width,) = node("Mul", [kv_heads, head])
    (sizes,) = node("Concat", [q_width, kv_width, kv_width], axis=0)
    q, k, v = node("Split", [formal["QKV"], sizes], 3, axis=-1)
    (per_head,) = node("Concat", [const([0, 0, -1]), head], axis=0)
    flat = const([0, 0, -1])
    normed = []
    for x, scale in ((q, formal["QNorm"]), (k, formal["KNorm"])):
        (view,) = node("Reshape", [x, per_head])
        (y,) = node("RMSNormalization", [view, scale], axis=-1, epsilon=ref("epsilon"))
        normed.append(node("Reshape", [y, flat])[0])
    nodes.append(
        gs.Node(
            "GroupQueryAttention",
            inputs=[*normed, v, *(formal[n] for n in ATTENTION.inputs[1:])],
            outputs=[formal[n] for n in op.outputs],
            attrs={name: ref(name) for name in ATTENTION_ATTRS},
            domain=MS,
        )
    )
    return _function(op, nodes, formal, opset, (MS, 1))


def _function(
    op: KernelOp,
    nodes: list[gs.Node],
    formal: dict[str, gs.Variable],
    opset: int,
    calls: tuple[str, int] | None = None,
) -> gs.Function:
    """The op's local function over `nodes`; `calls`: (domain, version) of ops the body uses beyond
    standard ONNX (ONNX Runtime's contrib ops, or this domain's own)."""
    imports = [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(*calls)] if calls else None
    return gs.Function(
        op.name,
        domain=DOMAIN,
        nodes=nodes,
        inputs=[formal[n] for n in op.inputs],
        outputs=[formal[n] for n in op.outputs],
        opset=opset,
        import_domains=imports,
        attrs=dict.fromkeys(op.attributes),
    )


def int8_cache_function(name: str, opset: int) -> gs.Function:
    """An attention op with an INT8 cache: the caches dequantized (code * scale, per channel), the
    float op (a node of this domain: its own local function) on them, its present caches quantized
    back (round(value / scale) clipped to +-127). Entries already cached come back to their codes:
    a code times its scale, rounded to T, is within 127 * 2**-11 of the code once divided back."""
    op = next(o for o in INT8_CACHE.values() if o.name == name)
    inner = name.removesuffix("Int8KV")
    formal = {n: gs.Variable(n) for n in (*op.inputs, *op.outputs)}
    nodes: list[gs.Node] = []

    def node(kind: str, inputs: list[gs.Tensor], outputs: int = 1, domain: str = "", **attrs: Any) -> list[gs.Variable]:
        outs = [gs.Variable(f"t{len(nodes)}_{i}") for i in range(outputs)]
        nodes.append(gs.Node(kind, inputs=inputs, outputs=outs, attrs=attrs, domain=domain or None))
        return outs

    like = formal["QKV"]
    (axis1,) = node("Constant", [], value_ints=[1])
    caches = []
    for past, scale in (("PastKey", "KScale"), ("PastValue", "VScale")):
        (typed,) = node("CastLike", [formal[past], like])
        (step,) = node("Unsqueeze", [node("CastLike", [formal[scale], like])[0], axis1])  # [KVH, 1, D]
        caches.append(node("Mul", [typed, step])[0])
    rest = [formal[n] for n in op.inputs if n not in ("QKV", "PastKey", "PastValue", "KScale", "VScale")]
    refs = {a: gs.Node.AttributeRef(a, ATTRIBUTE_TYPES[a]) for a in op.attributes}
    out, key, value = node(inner, [like, *caches, *rest], 3, DOMAIN, **refs)
    nodes[-1].outputs[0] = formal["Output"]
    (low,) = node("Constant", [], value_float=-float(KV_INT8_MAX))
    (high,) = node("Constant", [], value_float=float(KV_INT8_MAX))
    for present, scale, name_out in ((key, "KScale", "PresentKey"), (value, "VScale", "PresentValue")):
        (wide,) = node("Cast", [present], to=DType.FP32.onnx)
        (codes,) = node("Round", [node("Div", [wide, node("Unsqueeze", [formal[scale], axis1])[0]])[0]])
        (clipped,) = node("Clip", [codes, low, high])
        nodes.append(gs.Node("Cast", inputs=[clipped], outputs=[formal[name_out]], attrs={"to": DType.INT8.onnx}))
    del out
    return _function(op, nodes, formal, opset, (DOMAIN, VERSION))


def functions_for(name: str, opset: int) -> list[gs.Function]:
    """The op's local function and those its body calls (an INT8-cache attention calls the float one)."""
    if name.endswith("Int8KV"):
        return [int8_cache_function(name, opset), function(name.removesuffix("Int8KV"), opset)]
    return [function(name, opset)]


def function(name: str, opset: int) -> gs.Function:
    """The op's reference body in standard ONNX (opset >= 23: RMSNormalization)."""
    if name == ATTENTION.name:
        return attention_function(opset)
    if name == ATTENTION_QK_NORM.name:
        return attention_qk_norm_function(opset)
    if name.endswith("Int8KV"):
        return int8_cache_function(name, opset)
    op = OPS[name]
    formal = {n: gs.Variable(n) for n in (*op.inputs, *op.outputs)}
    nodes: list[gs.Node] = []

    def node(kind: str, inputs: list[gs.Tensor], out: gs.Variable | None = None, **attrs: Any) -> gs.Variable:
        result = out if out is not None else gs.Variable(f"t{len(nodes)}")
        nodes.append(gs.Node(kind, inputs=inputs, outputs=[result], attrs=attrs))
        return result

    x: gs.Tensor = formal["X"]
    if "Skip" in formal:
        x = node("Add", [x, formal["Skip"]], formal["Sum"])
    if "Gamma" in formal:
        epsilon = gs.Node.AttributeRef("epsilon", ATTRIBUTE_TYPES["epsilon"])
        x = node("RMSNormalization", [x, formal["Gamma"]], formal["Normed"], axis=-1, epsilon=epsilon)
    weight = _dequantized(node, formal) if "Scales" in formal else formal["W"]
    weight_t = node("Transpose", [weight], perm=[1, 0])
    if op.float_y:
        x = node("Cast", [x], to=DType.FP32.onnx)
        weight_t = node("Cast", [weight_t], to=DType.FP32.onnx)
    if "GateUp" not in formal:
        node("MatMul", [x, weight_t], formal["Y"])
    else:
        both = node("MatMul", [x, weight_t], formal["GateUp"])
        gate, up = gs.Variable("gate"), gs.Variable("up")
        nodes.append(gs.Node("Split", inputs=[both], outputs=[gate, up], attrs={"axis": -1, "num_outputs": 2}))
        act = node("Mul", [gate, node("Sigmoid", [gate])])
        node("Mul", [act, up], formal["Y"])
    return _function(op, nodes, formal, opset)


def _dequantized(node: Callable[..., gs.Variable], formal: dict[str, gs.Variable]) -> gs.Variable:
    """An NBits op's weight as T [N, K]: each byte of W split into 8 / bits codes (the low bits
    first), then (code - zero point) * scale over blocks of block_size codes along K."""

    def attr(name: str) -> Any:
        return gs.Node.AttributeRef(name, ATTRIBUTE_TYPES[name])

    def const(values: list[int] | float) -> gs.Variable:
        if isinstance(values, float):
            return node("Constant", [], value_float=values)
        return node("Constant", [], value_ints=values)

    bits = node("Constant", [], value_int=attr("bits"))  # int64 scalar
    block_1d = node("Unsqueeze", [node("Constant", [], value_int=attr("block_size")), const([0])])
    shifts = node(
        "Cast",
        [node("Range", [node("Constant", [], value_int=0), node("Constant", [], value_int=8), bits])],
        to=DType.UINT8.onnx,
    )
    two = const(2.0)
    mask = node(
        "Cast",
        [node("Sub", [node("Pow", [two, node("Cast", [bits], to=DType.FP32.onnx)]), const(1.0)])],
        to=DType.UINT8.onnx,
    )
    spread = node("BitShift", [node("Unsqueeze", [formal["W"], const([-1])]), shifts], direction="RIGHT")
    codes = node("Reshape", [node("BitwiseAnd", [spread, mask]), const([0, -1])])  # [N, K]
    typed = node("CastLike", [codes, formal["Scales"]])
    blocks = node("Reshape", [typed, node("Concat", [const([0, -1]), block_1d], axis=0)])  # [N, K / B, B]
    zeros = node("Unsqueeze", [node("CastLike", [formal["ZeroPoints"], formal["Scales"]]), const([-1])])
    scaled = node("Mul", [node("Sub", [blocks, zeros]), node("Unsqueeze", [formal["Scales"], const([-1])])])
    return node("Reshape", [scaled, const([0, -1])])


def nbits_attributes(values: dict[str, np.ndarray]) -> dict[str, int]:
    """An NBits op's bits and block_size, from its inputs' shapes (K is X's last dim)."""
    k = values["X"].shape[-1]
    return {"bits": values["W"].shape[-1] * 8 // k, "block_size": k // values["Scales"].shape[-1]}


def dequantized_weight(values: dict[str, np.ndarray]) -> np.ndarray:
    """An NBits op's weight [N, K] in float64: (code - zero point) * scale."""
    attrs = nbits_attributes(values)
    codes = unpack_nbits(values["W"], attrs["bits"]).astype(np.float64)
    n, k = codes.shape
    blocks = codes.reshape(n, -1, attrs["block_size"]) - values["ZeroPoints"][..., None]
    return np.asarray((blocks * values["Scales"].astype(np.float64)[..., None]).reshape(n, k))


def sample_values(
    name: str, rows: int, k: int, n: int, dtype: Any, seed: int = 0, bits: int = 4, block: int = 32
) -> dict[str, np.ndarray]:
    """Random inputs of the op for `rows` rows of K and N outputs (checks, benchmarks); an NBits op's
    weight has `bits`-bit codes, zero points and scales in blocks of `block` (block = K: per row)."""
    rng = np.random.default_rng(seed)
    n_w = 2 * n if "SwiGLU" in name else n
    values = {
        "X": rng.standard_normal((1, rows, k)).astype(dtype),
        "Skip": rng.standard_normal((1, rows, k)).astype(dtype),
        "Gamma": (1 + 0.1 * rng.standard_normal(k)).astype(dtype),
        "W": (rng.standard_normal((n_w, k)) / np.sqrt(k)).astype(dtype),
    }
    if "Scales" in OPS[name].inputs:
        levels = 1 << bits
        codes = rng.integers(0, levels, (n_w, k), dtype=np.uint8)
        values["W"] = pack_nbits(codes, bits)
        values["ZeroPoints"] = rng.integers(levels // 2 - 2, levels // 2 + 2, (n_w, k // block), dtype=np.uint8)
        # Scales making a weight's entries ~ 1 / sqrt(K), as the float ones.
        spread = levels / np.sqrt(12)
        values["Scales"] = (rng.uniform(0.5, 1.5, (n_w, k // block)) / (spread * np.sqrt(k))).astype(dtype)
    return {i: values[i] for i in OPS[name].inputs}


def one_op_model(name: str, values: dict[str, np.ndarray], epsilon: float = 1e-5, opset: int = 24) -> onnx.ModelProto:
    """A graph of the op alone, its inputs as graph inputs shaped like `values` (checks, benchmarks)."""
    spec = OPS[name]
    dtype = values["X"].dtype
    inputs = [gs.Variable(i, dtype=values[i].dtype, shape=values[i].shape) for i in spec.inputs]
    outputs = [gs.Variable(o, dtype=np.float32 if spec.output_type(o) == "F32" else dtype) for o in spec.outputs]
    attrs: dict[str, Any] = {"epsilon": epsilon} if "epsilon" in spec.attributes else {}
    if "bits" in spec.attributes:
        attrs.update(nbits_attributes(values))
    node = gs.Node(name, inputs=inputs, outputs=outputs, attrs=attrs, domain=DOMAIN)
    return _one_node_model(node, function(name, opset), opset)


def _one_node_model(node: gs.Node, body: gs.Function | list[gs.Function], opset: int) -> onnx.ModelProto:
    """`node` alone, its inputs and outputs the graph's, its local function(s) beside it."""
    bodies = body if isinstance(body, list) else [body]
    graph = gs.Graph([node], list(node.inputs), list(node.outputs), opset=opset, functions=bodies)
    attention = "GroupQueryAttention" in node.op
    domains = [("", opset), (DOMAIN, VERSION), *([(MS, 1)] if attention else [])]
    graph.import_domains = [onnx.helper.make_opsetid(d, v) for d, v in domains]
    model: onnx.ModelProto = gs.export_onnx(graph)
    model.ir_version = 10  # what ONNX Runtime 1.31+ reads
    return model


def attention_model(
    heads: int,
    kv_heads: int,
    head: int,
    capacity: int,
    dtype: Any,
    attrs: dict[str, Any] | None = None,
    opset: int = 24,
    qk_norm: bool = False,
    int8_cache: bool = False,
) -> onnx.ModelProto:
    """llm2trt's GroupQueryAttention alone, its inputs as graph inputs (checks, tests): QKV
    [batch, seq, (heads + 2 kv_heads) * head], caches [batch, kv_heads, capacity, head], rotary
    tables [capacity, head / 2]; `qk_norm`: GroupQueryAttentionQKNorm, with QNorm and KNorm [head]
    (epsilon 1e-6 unless `attrs` says); `int8_cache`: the Int8KV twin (int8 caches, KScale and
    VScale float32 [kv_heads, head])."""
    op = ATTENTION_QK_NORM if qk_norm else ATTENTION
    op = INT8_CACHE[op.name] if int8_cache else op
    types = {"I32": np.int32, "I8": np.int8, "F32": np.float32, "T": dtype}
    slots = (heads + 2 * kv_heads) * head
    shapes = {
        "QKV": ["batch", "seq", slots],
        "PastKey": ["batch", kv_heads, capacity, head],
        "PastValue": ["batch", kv_heads, capacity, head],
        "SeqlensK": ["batch"],
        "TotalSequenceLength": [],
        "CosCache": [capacity, head // 2],
        "SinCache": [capacity, head // 2],
        "QNorm": [head],
        "KNorm": [head],
        "KScale": [kv_heads, head],
        "VScale": [kv_heads, head],
    }
    inputs = [gs.Variable(n, dtype=types[op.input_type(n)], shape=shapes[n]) for n in op.inputs]
    outputs = [gs.Variable(n, dtype=types[op.output_type(n)]) for n in op.outputs]
    defaults = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": 1 / float(np.sqrt(head)), "do_rotary": 1}
    node_attrs = {**defaults, "rotary_interleaved": 0, "local_window_size": -1, **(attrs or {})}
    if qk_norm:
        node_attrs.setdefault("epsilon", 1e-6)
    node = gs.Node(op.name, inputs=inputs, outputs=outputs, attrs=node_attrs, domain=DOMAIN)
    return _one_node_model(node, functions_for(op.name, opset), opset)


def int8_cache_values(values: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """`attention_values`' inputs with INT8 caches: random codes and per-channel scales."""
    rng = np.random.default_rng(seed)
    kv_heads, head = values["PastKey"].shape[1], values["PastKey"].shape[-1]
    out = dict(values)
    for past, scale in (("PastKey", "KScale"), ("PastValue", "VScale")):
        out[scale] = rng.uniform(0.01, 0.05, (kv_heads, head)).astype(np.float32)
        out[past] = rng.integers(-KV_INT8_MAX, KV_INT8_MAX + 1, values[past].shape).astype(np.int8)
    return out


def dequantized_caches(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """INT8-cache inputs as the float ones they stand for (float64 caches: code * scale)."""
    out = dict(values)
    for past, scale in (("PastKey", "KScale"), ("PastValue", "VScale")):
        out[past] = values[past].astype(np.float64) * values[scale].astype(np.float64)[:, None, :]
    return out


def attention_values(
    lengths: list[int],
    seq: int,
    total: int,
    shape: tuple[int, int, int, int],
    dtype: Any,
    seed: int = 0,
    qk_norm: bool = False,
) -> dict[str, np.ndarray]:
    """Random inputs of llm2trt's GroupQueryAttention (checks, tests): rows of `lengths` tokens once
    this call's `seq` new ones are in (seqlens_k = length - 1); shape = (heads, KV heads, head size,
    cache slots); real rotary tables; `qk_norm`: QNorm and KNorm scales too."""
    rng = np.random.default_rng(seed)
    heads, kv_heads, head, capacity = shape
    angles = np.arange(capacity)[:, None] / 10000 ** (np.arange(head // 2) / (head // 2))
    cache = (len(lengths), kv_heads, capacity, head)
    return {
        "QKV": rng.standard_normal((len(lengths), seq, (heads + 2 * kv_heads) * head)).astype(dtype),
        "PastKey": rng.standard_normal(cache).astype(dtype),
        "PastValue": rng.standard_normal(cache).astype(dtype),
        "SeqlensK": np.array(lengths, np.int32) - 1,
        "TotalSequenceLength": np.array(total, np.int32),
        "CosCache": np.cos(angles).astype(dtype),
        "SinCache": np.sin(angles).astype(dtype),
        **({n: (1 + 0.2 * rng.standard_normal(head)).astype(dtype) for n in ("QNorm", "KNorm")} if qk_norm else {}),
    }


def attention_reference(
    values: dict[str, np.ndarray], heads: int, kv_heads: int, window: int = -1, epsilon: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's output and present key in float64, with no intermediate rounding, for
    the inputs `attention_values` makes; a padded prompt's tail rows are left zero (they are padding).
    `window` (local_window_size, > 0): each query sees its `window` latest keys, itself included.
    With QNorm and KNorm among the values, q and k are RMS-normalized per head (`epsilon`) first."""
    qkv = values["QKV"].astype(np.float64)
    batch, seq, _ = qkv.shape
    keys = values["PastKey"].astype(np.float64).copy()
    cache_values = values["PastValue"].astype(np.float64).copy()
    head = keys.shape[-1]
    cos, sin = (values[n].astype(np.float64) for n in ("CosCache", "SinCache"))
    total = int(values["TotalSequenceLength"])
    split = qkv.reshape(batch, seq, heads + 2 * kv_heads, head).copy()
    if "QNorm" in values:
        for lo, hi, name in ((0, heads, "QNorm"), (heads, heads + kv_heads, "KNorm")):
            part = split[:, :, lo:hi]
            rms = np.sqrt((part * part).mean(-1, keepdims=True) + epsilon)
            split[:, :, lo:hi] = part / rms * values[name].astype(np.float64)

    def rotate(x: np.ndarray, pos: int) -> np.ndarray:
        low, high = x[..., : head // 2], x[..., head // 2 :]
        c, s = cos[pos], sin[pos]
        return np.concatenate([low * c - high * s, high * c + low * s], axis=-1)

    out = np.zeros((batch, seq, heads, head))
    for b in range(batch):
        length = int(values["SeqlensK"][b]) + 1
        past = 0 if seq == total else length - seq
        for i in range(min(seq, length - past)):  # a token sees the keys up to its own, its own included
            keys[b, :, past + i] = rotate(split[b, i, heads : heads + kv_heads], past + i)
            cache_values[b, :, past + i] = split[b, i, heads + kv_heads :]
            q = rotate(split[b, i, :heads], past + i) / np.sqrt(head)
            low = max(0, past + i + 1 - window) if window > 0 else 0
            k = np.repeat(keys[b, :, low : past + i + 1], heads // kv_heads, axis=0)
            v = np.repeat(cache_values[b, :, low : past + i + 1], heads // kv_heads, axis=0)
            scores = np.einsum("hd,htd->ht", q, k)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, i] = np.einsum("ht,htd->hd", weights / weights.sum(-1, keepdims=True), v)
    return out.reshape(batch, seq, heads * head), keys


def reference(name: str, values: dict[str, np.ndarray], epsilon: float = 1e-5) -> np.ndarray:
    """The op's Y in float64, with no intermediate rounding."""
    v = values["X"].astype(np.float64)
    if "Skip" in OPS[name].inputs:
        v = v + values["Skip"]
    if "Gamma" in OPS[name].inputs:
        v = v / np.sqrt((v * v).mean(-1, keepdims=True) + epsilon) * values["Gamma"]
    weight = dequantized_weight(values) if "Scales" in values else values["W"].astype(np.float64)
    z = v @ weight.T
    if "SwiGLU" in name:
        gate, up = np.split(z, 2, axis=-1)
        z = gate / (1 + np.exp(-gate)) * up
    return np.asarray(z)


@dataclass
class _Norm:
    """A norm whose output only constant-weight MatMuls read."""

    node: gs.Node
    x: gs.Tensor
    skip: gs.Tensor | None
    gamma: gs.Tensor
    epsilon: float
    normed: gs.Tensor
    readers: list[gs.Node]


def add_functions(model: Model, ops: list[str]) -> None:
    """The local functions of `ops` (and those their bodies call), each once, and the domain's import."""
    if not ops:
        return
    existing = {(f.domain, f.name) for f in model.graph.functions}
    for body in (f for name in ops for f in functions_for(name, model.opset)):
        if (DOMAIN, body.name) not in existing:
            model.graph.functions.append(body)
            existing.add((DOMAIN, body.name))
    domains = list(model.graph.import_domains or [])
    if not any(d.domain == DOMAIN for d in domains):
        model.graph.import_domains = [*domains, onnx.helper.make_opsetid(DOMAIN, VERSION)]


class OrtKernelsPass(GraphPass):
    """The gqa graph's norms, GEMVs and SwiGLUs -> llm2trt's ops (see the module docstring)."""

    name = "ort_kernels"
    runs_after: ClassVar[tuple[str, ...]] = ("ort_gqa",)

    def run(self, model: Model) -> PassResult:
        self.made: dict[str, _Weight] = {}  # the ops' weights by source weight (shared weights once)
        counts = dict.fromkeys(ALL_OPS, 0)
        self.refused: dict[str, int] = {}
        # QK-norm layers first: their packed QKV MatMul leaves the input norm one reader to fuse with.
        for node in [n for n in model.graph.nodes if _separate_qkv(n)]:
            self._count(_qk_norm_attention(model, node), ATTENTION_QK_NORM.name, counts)
        if counts[ATTENTION_QK_NORM.name]:  # drop what only sized the old projections' views (Shape nodes)
            model.graph.cleanup(remove_unused_graph_inputs=False)
        norms = ("RMSNormalization", "SkipSimplifiedLayerNormalization")
        for norm in [n for n in model.graph.nodes if n.op in norms and n.inputs]:  # (not the QK-norms just dropped)
            found = _norm(norm)
            reason = found if isinstance(found, str) else self._fuse_norm(model, found, counts)
            if reason:
                self.refused[reason] = self.refused.get(reason, 0) + 1
        self._linears(model, counts)
        for node in [n for n in model.graph.nodes if n.op == "GroupQueryAttention" and n.domain == MS and n.inputs]:
            if not _separate_qkv(node):  # (those refused above already)
                self._count(_attention(model, node), ATTENTION.name, counts)
        used = [name for name, count in counts.items() if count]
        add_functions(model, used)
        model.graph.cleanup(remove_unused_graph_inputs=False)
        model.graph.toposort()
        refusals = {f"not fused ({why})": n for why, n in self.refused.items()}
        # The quantized twins are listed where the graph has them (most graphs are float).
        counts = {op: n for op, n in counts.items() if n or not op.endswith(("NBits", "NBitsF32", "Int8KV"))}
        return PassResult(modified=bool(used), counts={**counts, **refusals})

    def _count(self, reason: str, op: str, counts: dict[str, int]) -> None:
        if reason:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        else:
            counts[op] += 1

    def _linears(self, model: Model, counts: dict[str, int]) -> None:
        """Every remaining MatMul by a 2-D constant -> Linear (or its float-Y twin for the logits)."""
        for matmul in [n for n in model.graph.nodes if n.op == "MatMul" and len(n.inputs) == 2]:
            weight = _weight_rows(matmul)
            if weight is None or not _float(matmul.inputs[0]):
                reason = refusal(matmul.inputs[1])
                if reason:
                    self.refused[reason] = self.refused.get(reason, 0) + 1
                continue
            w = weight(model, self.made)
            out = matmul.outputs[0]
            op = _widened(model, f"Linear{w.suffix}", out)
            _replace(model, matmul, op, [matmul.inputs[0], *w.inputs], [out], w.attrs)
            counts[op] += 1

    def _fuse_norm(self, model: Model, norm: _Norm, counts: dict[str, int]) -> str:
        """Rewrite `norm` and the MatMul(s) reading it; '' when done, else why not."""
        readers = norm.readers
        if len(readers) == 1:
            weight = _weight_rows(readers[0])
            if weight is None:
                return _weight_refusal(readers[0])
            ys = [readers[0].outputs[0]]
            w = weight(model, self.made)
            op = _widened(model, f"{'RMSNormLinear' if norm.skip is None else 'SkipRMSNormLinear'}{w.suffix}", ys[0])
        elif len(readers) == 2 and norm.skip is not None:
            pair = _swiglu(readers)
            if isinstance(pair, str):
                return pair
            (gate, up), mul, act = pair
            joined = _gate_up(model, gate, up)
            if isinstance(joined, str):
                return joined
            w = joined
            ys = [mul.outputs[0]]
            for dead in (gate, up, act, mul):
                dead.inputs.clear()
                dead.outputs.clear()
            op = f"SkipRMSNormSwiGLU{w.suffix}"
        else:
            return f"{len(readers)} readers of the normalized output"
        inputs = [norm.x, *([norm.skip] if norm.skip is not None else []), norm.gamma, *w.inputs]
        outputs = [*ys]
        if norm.skip is not None:
            outputs.append(_sum_output(model, norm.node))
        outputs.append(norm.normed)
        if "SwiGLU" in op:
            outputs.append(gs.Variable(model.fresh_name(f"{norm.node.name}/GateUp"), dtype=norm.normed.dtype))
        for reader in readers:
            reader.inputs.clear()
            reader.outputs.clear()
        _replace(model, norm.node, op, inputs, outputs, {"epsilon": norm.epsilon, **w.attrs})
        counts[op] += 1
        return ""


def _gate_up(model: Model, gate: gs.Node, up: gs.Node) -> _Weight | str:
    """SwiGLU's weight: gate's rows then up's, float or NBits alike; else why not."""
    if _weight_rows(gate) is None or _weight_rows(up) is None:
        return refusal(gate.inputs[1]) or refusal(up.inputs[1]) or "gate/up weights are not 2-D constants"
    name = f"{gate.inputs[1].name}.gate_up_rows"
    quantized = [nbits_weight(m.inputs[1]) for m in (gate, up)]
    if quantized[0] is None and quantized[1] is None:
        stacked = np.concatenate([_rows(gate), _rows(up)], axis=0)
        return _Weight([model.constant(model.fresh_name(name), stacked)], {})
    both = stacked_nbits([q for q in quantized if q is not None]) if None not in quantized else None
    if both is None:
        return "gate and up quantized differently"
    return _nbits_inputs(model, both, name)


# ONNX Runtime's defaults for the attributes llm2trt's op carries (num_heads and kv_num_heads have none).
_GQA_DEFAULTS = {"scale": 0.0, "do_rotary": 0, "rotary_interleaved": 0, "local_window_size": -1}


def _attention(model: Model, node: gs.Node) -> str:
    """ONNX Runtime's GroupQueryAttention -> llm2trt's; '' when done, else why not."""
    inputs = list(node.inputs) + [gs.Variable.empty()] * (9 - len(node.inputs))
    attrs = {**_GQA_DEFAULTS, **{name: node.attrs[name] for name in ATTENTION_ATTRS if name in node.attrs}}
    reason = _attention_refusal(inputs, attrs, set(node.attrs) - set(ATTENTION_ATTRS))
    if not reason:
        _replace(model, node, ATTENTION.name, [inputs[0], *inputs[3:9]], list(node.outputs), attrs)
    return reason


def _attention_refusal(inputs: list[gs.Tensor], attrs: dict[str, Any], others: set[str]) -> str:
    """Why llm2trt's kernels cannot take this GroupQueryAttention ('' when they can)."""
    if others:
        return f"GroupQueryAttention with {', '.join(sorted(others))}"
    if any(t.name for t in inputs[1:3]) or not _float(inputs[0]):
        return "GroupQueryAttention with separate key and value, or not float16/float32"
    if (attrs["do_rotary"], attrs["rotary_interleaved"]) != (1, 0):
        return "GroupQueryAttention without half-split rotary inside"
    if int(attrs["local_window_size"]) != -1 and int(attrs["local_window_size"]) < 1:
        return "GroupQueryAttention with a local window under one key"
    head = inputs[3].shape[-1] if inputs[3].shape else None
    if head not in ATTENTION_HEAD_SIZES:
        return f"GroupQueryAttention with a head size other than {ATTENTION_HEAD_SIZES_TEXT}"
    if any(t.inputs for t in inputs[3:6]) or not all(isinstance(t, gs.Constant) for t in inputs[7:9]):
        # The decode kernel reads the caches, the lengths and the tables before the kernel ahead of it ends.
        return "GroupQueryAttention whose caches, lengths or rotary tables are computed in the graph"
    if inputs[7].shape[-1] * 2 != head:
        return "GroupQueryAttention rotating part of the head"
    if int(attrs["num_heads"]) > ATTENTION_MAX_GROUP * int(attrs["kv_num_heads"]):
        return f"GroupQueryAttention with more than {ATTENTION_MAX_GROUP} query heads a KV head"
    return ""


def _separate_qkv(node: gs.Node) -> bool:
    """ONNX Runtime's GroupQueryAttention fed q, k and v apart (the QK-norm layers of `--kv-form gqa`)."""
    inputs = node.inputs
    return node.op == "GroupQueryAttention" and node.domain == MS and len(inputs) > 2 and bool(inputs[2].name)


def _consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


def _producer_of(tensor: gs.Tensor, op: str) -> gs.Node | None:
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and node.op == op and len(tensor.outputs) == 1 else None


@dataclass
class _NormedProjection:
    """q or k of a QK-norm layer: MatMul(x, W) viewed per head, [Cast] RMSNormalization [Cast], flat."""

    x: gs.Tensor
    weight: gs.Tensor  # a constant, or the DequantizeLinear of constants
    gamma: gs.Constant
    epsilon: float
    nodes: list[gs.Node]  # every node from the MatMul to the flattening Reshape


def _projection(tensor: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Node] | None:
    """(x, W, the MatMul) when `tensor` is MatMul(x, W), W a 2-D constant (or the DequantizeLinear of
    constants a quantized layer reads), read by one node."""
    matmul = _producer_of(tensor, "MatMul")
    if matmul is None:
        return None
    weight = matmul.inputs[1]
    if not isinstance(weight, gs.Constant) and dequantize_node(weight) is None:
        return None
    return (matmul.inputs[0], weight, matmul) if weight.shape is not None and len(weight.shape) == 2 else None


def _packed_weight(model: Model, weights: list[gs.Tensor], name: str) -> tuple[gs.Tensor, np.dtype[Any]] | str:
    """q, k and v's weights side by side, and their float type; quantized alike, one DequantizeLinear
    of the joined codes; else why not."""
    if all(isinstance(w, gs.Constant) for w in weights):
        values = [read_values(w) for w in weights]
        if len({w.shape[0] for w in values}) != 1 or len({w.dtype for w in values}) != 1:
            return "GroupQueryAttention with QK-norm projections of different shapes or types"
        return model.constant(model.fresh_name(name), np.concatenate(values, axis=1)), values[0].dtype
    joined = concatenated(model, weights, name)
    if joined is None:
        return "GroupQueryAttention with QK-norm projections quantized differently"
    return joined, DType.parse(joined.dtype).numpy


def _through_cast(tensor: gs.Tensor, chain: list[gs.Node]) -> gs.Tensor:
    """The input of the Cast producing `tensor` (appended to `chain`), or `tensor` where none does:
    the float32 round trip of a model that normalizes in float32."""
    cast = _producer_of(tensor, "Cast")
    if cast is None:
        return tensor
    chain.append(cast)
    return cast.inputs[0]


def _normed_projection(tensor: gs.Tensor) -> _NormedProjection | None:
    flat = _producer_of(tensor, "Reshape")
    if flat is None:
        return None
    chain = [flat]
    current = _through_cast(flat.inputs[0], chain)
    norm = _producer_of(current, "RMSNormalization")
    if norm is None or int(norm.attrs.get("axis", -1)) not in (-1, 3) or not isinstance(norm.inputs[1], gs.Constant):
        return None
    chain.append(norm)
    current = _through_cast(norm.inputs[0], chain)
    view = _producer_of(current, "Reshape")
    found = _projection(view.inputs[0]) if view is not None else None
    if view is None or found is None:
        return None
    x, weight, matmul = found
    return _NormedProjection(x, weight, norm.inputs[1], float(norm.attrs.get("epsilon", 1e-5)), [*chain, view, matmul])


def _qk_norm_attention(model: Model, node: gs.Node) -> str:
    """ONNX Runtime's GroupQueryAttention whose q and k are per-head-normalized projections and v a
    projection, all three of one input (QK-norm: Qwen3, Gemma 3) ==> one packed QKV MatMul and
    llm2trt's GroupQueryAttentionQKNorm; '' when done, else why not."""
    q, k = _normed_projection(node.inputs[0]), _normed_projection(node.inputs[1])
    v = _projection(node.inputs[2])
    if q is None or k is None or v is None:
        return "GroupQueryAttention with separate q, k, v that are not QK-normed projections"
    if not (q.x is k.x is v[0]) or q.epsilon != k.epsilon:
        return "GroupQueryAttention with QK-norm over different inputs or epsilons"
    dtype = node.inputs[0].dtype
    inputs = [node.inputs[0], gs.Variable.empty(), gs.Variable.empty(), *node.inputs[3:9]]
    inputs += [gs.Variable.empty()] * (9 - len(inputs))
    attrs = {**_GQA_DEFAULTS, **{name: node.attrs[name] for name in ATTENTION_ATTRS if name in node.attrs}}
    reason = _attention_refusal(inputs, attrs, set(node.attrs) - set(ATTENTION_ATTRS))
    if reason:
        return reason
    scope = node.name.rsplit("/", 1)[0] if node.name else "qk_norm"
    found = _packed_weight(model, [q.weight, k.weight, v[1]], f"{scope}/qkv_proj.weight")
    if isinstance(found, str):
        return found
    packed, np_dtype = found
    qkv = gs.Variable(model.fresh_name(f"{scope}/qkv_proj/MatMul_output_0"), dtype=dtype)
    matmul = gs.Node("MatMul", model.fresh_name(f"{scope}/qkv_proj/MatMul"), inputs=[q.x, packed], outputs=[qkv])
    model.graph.nodes.append(matmul)
    model.tag(matmul, "ORT.qkv_packed")
    scales = [
        model.constant(
            model.fresh_name(f"{p.gamma.name}.{np.dtype(np_dtype).name}"), read_values(p.gamma).astype(np_dtype)
        )
        for p in (q, k)
    ]
    for dead in (*q.nodes, *k.nodes, v[2]):
        dead.inputs.clear()
        dead.outputs.clear()
    _replace(
        model,
        node,
        ATTENTION_QK_NORM.name,
        [qkv, *node.inputs[3:9], *scales],
        list(node.outputs),
        {**attrs, "epsilon": q.epsilon},
    )
    return ""


def _widened(model: Model, op: str, y: gs.Tensor) -> str:
    """`op`, or its float-Y twin where Y is a float16 graph output (the logits), then made float32."""
    if not any(y is out for out in model.graph.outputs) or DType.find(y.dtype) != DType.FP16:
        return op
    y.dtype = np.float32
    return FLOAT_Y[op]


def _float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and DType.find(tensor.dtype) in FLOATS


def _norm(node: gs.Node) -> _Norm | str:
    if not _float(node.inputs[0]):
        return "not float16/float32"
    if node.op == "RMSNormalization":
        if int(node.attrs.get("axis", -1)) != -1 or int(node.attrs.get("stash_type", 1)) != 1:
            return "RMSNormalization over more than the last axis"
        x, skip, gamma = node.inputs[0], None, node.inputs[1]
    else:
        if len(node.inputs) != 3:
            return "SkipSimplifiedLayerNormalization with a bias"
        x, skip, gamma = node.inputs
    if not isinstance(gamma, gs.Constant) or len(gamma.shape) != 1:
        return "its scale is not a 1-D constant"
    normed = node.outputs[0]
    readers = list(normed.outputs)
    if not readers or any(r.op != "MatMul" or r.inputs[0] is not normed for r in readers):
        return "the normalized output is read by other than MatMul"
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    return _Norm(node, x, skip, gamma, epsilon, normed, readers)


def _swiglu(readers: list[gs.Node]) -> tuple[tuple[gs.Node, gs.Node], gs.Node, gs.Node] | str:
    """((gate, up), the Mul, the activation) for MatMul pairs read as Mul(SiLU(gate), up)."""
    for gate, up in (readers, readers[::-1]):
        acts = gate.outputs[0].outputs
        if len(acts) != 1 or acts[0].op != "QuickGelu" or float(acts[0].attrs.get("alpha", 1.0)) != 1.0:
            continue
        muls = acts[0].outputs[0].outputs
        ups = up.outputs[0].outputs
        if len(muls) == 1 and muls[0].op == "Mul" and len(ups) == 1 and ups[0] is muls[0]:
            return (gate, up), muls[0], acts[0]
    return "two readers that are not silu(gate) * up"


@dataclass(frozen=True)
class _Weight:
    """A GEMV op's weight inputs: [W] ([N, K] float rows), or [W, Scales, ZeroPoints] with the
    NBits attributes (`passes/nbits.py`)."""

    inputs: list[gs.Tensor]
    attrs: dict[str, int]

    @property
    def suffix(self) -> str:
        return "NBits" if self.attrs else ""


# (the model, the weights made so far by source name) -> MatMul's weight in the ops' layout
WeightMaker = Callable[[Model, dict[str, _Weight]], _Weight]


def _weight_rows(matmul: gs.Node) -> WeightMaker | None:
    """How to make MatMul's weight in the ops' layout (None where it is no 2-D constant nor a
    quantized one the ops take): the constant a tied lm_head transposes, as it is; a DequantizeLinear
    of constants, as NBits codes, scales and zero points; any other constant, transposed; each once
    per weight however many MatMuls share it."""
    weight = matmul.inputs[1]
    tied = transposed_constant(weight)
    if tied is not None and len(tied.inputs[0].shape) == 2 and list(tied.attrs.get("perm", [1, 0])) == [1, 0]:
        source = tied.inputs[0]
        return lambda model, made: _Weight([source], {})
    if dequantize_node(weight) is not None:
        return None if refusal(weight) else lambda model, made: _nbits(model, made, weight)
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2:
        return None

    def make(model: Model, made: dict[str, _Weight]) -> _Weight:
        if weight.name not in made:
            made[weight.name] = _Weight([model.constant(model.fresh_name(f"{weight.name}.rows"), _rows(matmul))], {})
        return made[weight.name]

    return make


def _weight_refusal(matmul: gs.Node) -> str:
    return refusal(matmul.inputs[1]) or "its reader's weight is not a 2-D constant"


def _nbits(model: Model, made: dict[str, _Weight], weight: gs.Tensor) -> _Weight:
    if weight.name not in made:
        found = nbits_weight(weight)
        if found is None:  # (_weight_rows asked refusal() first)
            raise ValueError(f"{weight.name} has no NBits form")
        made[weight.name] = _nbits_inputs(model, found, weight.name)
    return made[weight.name]


def _nbits_inputs(model: Model, found: NBitsWeight, name: str) -> _Weight:
    tensors = [
        model.constant(model.fresh_name(f"{name}.{role}"), values)
        for role, values in (("codes", found.packed), ("scales", found.scales), ("zeros", found.zeros))
    ]
    return _Weight(list(tensors), {"bits": found.bits, "block_size": found.block})


def _rows(matmul: gs.Node) -> np.ndarray:
    weight = matmul.inputs[1]
    tied = transposed_constant(weight)
    if tied is not None:
        return read_values(tied.inputs[0])
    return np.ascontiguousarray(read_values(weight).T)


def _sum_output(model: Model, node: gs.Node) -> gs.Tensor:
    """SkipSimplifiedLayerNormalization's sum (its fourth output), named even when nothing reads it."""
    if len(node.outputs) > 3 and node.outputs[3].name:
        return node.outputs[3]
    return gs.Variable(model.fresh_name(f"{node.name}/Sum"), dtype=node.outputs[0].dtype)


def _replace(
    model: Model, old: gs.Node, op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], attrs: dict[str, Any]
) -> None:
    name = model.fresh_name(f"{old.name}/{op}" if old.name else op)
    old.inputs.clear()
    old.outputs.clear()
    node = gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=outputs, domain=DOMAIN)
    model.graph.nodes.append(node)
    model.tag(node, f"ORT.{op}")
