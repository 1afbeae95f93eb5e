"""llm2trt's MoE op (routed experts): its reference body, and where a graph gets it.

The op (passes/ort_op_table.py's `MOE`) comes from the export, not from a rewrite of the traced graph:
transformers runs its experts as a Python loop over the experts a batch routes to, which traces into
shapes that depend on the data (one gather and one index_add per expert hit); convert/patches.py's
`experts_for_export` has each experts module emit one `llm2trt.MoE` node instead, fed by the router
exactly as the model computes it (softmax, top-k, renormalization stay ordinary ONNX ops).

The body is the reference, in standard ONNX: every expert runs on every row (dense) and the routing
weights (zero for experts not chosen) mix them; ONNX Runtime runs it anywhere, TensorRT inlines it.
A CUDA kernel replaces it where llm2trt's library is registered and reads only the routed experts.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from llm2trt.core.dtypes import DType
from llm2trt.passes.ort_op_table import DOMAIN, MOE, VERSION


def moe_function_proto(opset: int) -> onnx.FunctionProto:
    """The MoE op's body at `opset` (>= 15: CastLike)."""

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, outputs, **attrs)

    def const(name: str, value: int | float, elem: int) -> onnx.NodeProto:
        return node("Constant", [], [name], value=helper.make_tensor(name, elem, [], [value]))

    # The first expert's id comes from the node's attribute.
    first = helper.make_node("Constant", [], ["first"])
    first.attribute.append(
        onnx.AttributeProto(name="value_int", ref_attr_name="first_expert", type=onnx.AttributeProto.INT)
    )
    nodes = [
        first,
        node("Constant", [], ["last_axes"], value=helper.make_tensor("la", TensorProto.INT64, [1], [2])),
        node("Constant", [], ["first_axes"], value=helper.make_tensor("fa", TensorProto.INT64, [1], [0])),
        node("Constant", [], ["second_axes"], value=helper.make_tensor("sa", TensorProto.INT64, [1], [1])),
        # Routing as a dense [N, E] matrix: a row's weight at each of its experts, by comparing its
        # ids with this op's block of expert ids (ids outside it, under expert parallelism, match none).
        # (No ScatterElements: TensorRT's parser takes no `add` reduction.)
        node("Shape", ["GateUp"], ["e"], start=0, end=1),
        node("Squeeze", ["e"], ["e_scalar"]),
        node("Add", ["e_scalar", "first"], ["last"]),
        const("one", 1, TensorProto.INT64),
        node("Range", ["first", "last", "one"], ["block"]),
        node("Unsqueeze", ["ExpertIds", "last_axes"], ["ids"]),
        node("Equal", ["ids", "block"], ["match"]),
        node("Cast", ["match"], ["match_f"], to=DType.FP32.onnx),
        node("Unsqueeze", ["ExpertWeights", "last_axes"], ["w"]),
        node("Mul", ["match_f", "w"], ["routed"]),
        node("ReduceSum", ["routed", "second_axes"], ["dense"], keepdims=0),
        # Every expert on every row: [N, H] x [E, H, 2I] -> [E, N, 2I], then SwiGLU and Down.
        node("Transpose", ["GateUp"], ["gate_up_t"], perm=[0, 2, 1]),
        node("MatMul", ["X", "gate_up_t"], ["gu"]),
        node("Shape", ["Down"], ["i"], start=2, end=3),
        node("Concat", ["i", "i"], ["halves"], axis=0),
        node("Split", ["gu", "halves"], ["gate", "up"], axis=2),
        node("Sigmoid", ["gate"], ["sig"]),
        node("Mul", ["gate", "sig"], ["act"]),
        node("Mul", ["act", "up"], ["h"]),
        node("Transpose", ["Down"], ["down_t"], perm=[0, 2, 1]),
        node("MatMul", ["h", "down_t"], ["per_expert"]),
        # Mixed in float32: [E, N, H] * [E, N, 1], summed over the experts.
        node("Transpose", ["dense"], ["dense_t"], perm=[1, 0]),
        node("Unsqueeze", ["dense_t", "last_axes"], ["mix"]),
        node("Cast", ["per_expert"], ["per_expert_f"], to=DType.FP32.onnx),
        node("Mul", ["per_expert_f", "mix"], ["weighted"]),
        node("ReduceSum", ["weighted", "first_axes"], ["total"], keepdims=0),
        node("CastLike", ["total", "X"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        MOE.name,
        list(MOE.inputs),
        list(MOE.outputs),
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(MOE.attributes),
    )


def moe_function(opset: int) -> gs.Function:
    """The body as an onnx-graphsurgeon function (passes that rebuild a graph's functions)."""
    holder = helper.make_model(
        helper.make_graph([], "holder", [], []),
        functions=[moe_function_proto(opset)],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
    )
    function: gs.Function = gs.import_onnx(holder).functions[0]
    return function


def attach_moe(proto: onnx.ModelProto) -> int:
    """Give an exported model the body of the MoE nodes it has (and the llm2trt opset); their count."""
    count = sum(1 for n in proto.graph.node if n.domain == DOMAIN and n.op_type == MOE.name)
    if not count:
        return 0
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == MOE.name for f in proto.functions):
        proto.functions.append(moe_function_proto(opset))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return count
