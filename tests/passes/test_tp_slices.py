"""The tensor-parallel column split of fused projections: the Slices (and Splits) that take q, k
and v, or gate and up, out of one projection are narrowed to the rank's features, and head
reshapes that spell a head count count the rank's heads (Phi-3's qkv_proj and gate_up_proj); past
the projections, a per-head score bias keeps the rank's heads (ALiBi's slopes) and views of per-head
data count them, or are refused where two entries could be the head count."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm2trt.core.errors import InputError
from llm2trt.core.numerics import run_ort
from llm2trt.core.tp import Heads, LayerSplit, Mapping, Split, TPPlan, Units, feature_index
from llm2trt.passes.manager import Model
from llm2trt.passes.tensor_parallel import _Rewrite

HEADS = Heads(4, 2, 4)  # 4 query heads, 2 KV heads, head_dim 4: q 16 + k 8 + v 8 = 32 features
BIG = np.iinfo(np.int64).max
QKV, GATE_UP = LayerSplit(Split.COLUMN, Units.QKV), LayerSplit(Split.COLUMN, Units.HALVES)
OUTPUTS = ("q", "k", "v", "act", "act_split", "rows")


def _ints(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(bounded_by: str | None = None) -> onnx.ModelProto:
    """x @ qkv -> q/k/v by Slices -> head reshapes; x @ gate_up -> halves by Slices (and by a
    Split) -> gate * up. `bounded_by`: a graph input that gives q's end instead of a constant."""
    rng = np.random.default_rng(0)
    q_end = bounded_by or "q_end"
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"], name="/model/layers.0/self_attn/qkv_proj/MatMul"),
        helper.make_node("Slice", ["qkv", "zero", q_end, "last"], ["q_flat"], name="q_slice"),
        helper.make_node("Slice", ["qkv", "q_end", "k_end", "last"], ["k_flat"], name="k_slice"),
        helper.make_node("Slice", ["qkv", "k_end", "big", "last"], ["v_flat"], name="v_slice"),
        helper.make_node("Reshape", ["q_flat", "q_shape"], ["q"]),  # [n, 4, 4]: a head count
        helper.make_node("Reshape", ["k_flat", "k_shape"], ["k"]),  # [n, 2, 4]
        helper.make_node("Reshape", ["v_flat", "v_shape"], ["v"]),  # [n, -1, 4]: adapts alone
        helper.make_node("MatMul", ["x", "w_gu"], ["gu"], name="/model/layers.0/mlp/gate_up_proj/MatMul"),
        helper.make_node("Slice", ["gu", "zero", "half", "last"], ["gate"]),
        helper.make_node("Slice", ["gu", "half", "whole", "last"], ["up"]),
        helper.make_node("Mul", ["gate", "up"], ["act"]),
        helper.make_node("MatMul", ["x", "w_gu2"], ["gu2"], name="/model/layers.1/mlp/gate_up_proj/MatMul"),
        helper.make_node("Split", ["gu2", "halves"], ["gate2", "up2"], axis=-1),
        helper.make_node("Mul", ["gate2", "up2"], ["act_split"]),
        # The first rows (positions) of qkv, by a bound from the graph: not the features, left alone.
        helper.make_node("Slice", ["qkv", "zero", "rows_end", "first"], ["rows"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32), "w_qkv"),
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w_gu"),
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w_gu2"),
        _ints("zero", 0),
        _ints("q_end", 16),
        _ints("k_end", 24),
        _ints("big", BIG),
        _ints("last", -1),
        _ints("first", 0),
        _ints("q_shape", 0, 4, 4),
        _ints("k_shape", 0, 2, 4),
        _ints("v_shape", 0, -1, 4),
        _ints("half", 8),
        _ints("whole", 16),
        _ints("halves", 8, 8),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
        helper.make_tensor_value_info("rows_end", TensorProto.INT64, [1]),
    ]
    if bounded_by:
        inputs.append(helper.make_tensor_value_info(bounded_by, TensorProto.INT64, [1]))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in OUTPUTS], inits
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return onnx.shape_inference.infer_shapes(proto)


def _split(proto: onnx.ModelProto, mapping: Mapping) -> Model:
    model = Model.from_onnx(proto)
    rewrite = _Rewrite(model, TPPlan(mapping, HEADS, ()))
    for node in list(model.graph.nodes):
        if node.op == "MatMul":
            rewrite.column(node, QKV if "qkv_proj" in node.name else GATE_UP)
    model.graph.cleanup()
    return model


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_get_their_heads_of_q_k_v_and_their_halves(tp: int) -> None:
    proto = _model()
    x = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32), "rows_end": np.array([2])}
    full = run_ort(proto.SerializeToString(), x)
    for mapping in Mapping.ranks(tp):
        model = _split(proto, mapping)
        got = run_ort(model.to_onnx().SerializeToString(), x)
        q, kv = HEADS.q_heads(mapping), HEADS.kv_heads_of(mapping)
        assert np.allclose(got["q"], full["q"][:, q.start : q.stop])
        assert np.allclose(got["k"], full["k"][:, kv.start : kv.stop])  # a replicated KV head at tp 4
        assert np.allclose(got["v"], full["v"][:, kv.start : kv.stop])
        assert np.allclose(got["rows"], full["rows"][:, feature_index(Units.QKV, HEADS, mapping, 32)])
        per = 8 // tp  # each rank: its columns of gate and the matching ones of up
        for name in ("act", "act_split"):
            assert np.allclose(got[name], full[name][:, mapping.rank * per : (mapping.rank + 1) * per])


def test_slices_with_computed_bounds_are_refused() -> None:
    with pytest.raises(InputError, match="q_slice slices the column-parallel output 'qkv' by bounds computed"):
        _split(_model(bounded_by="q_end_input"), Mapping(2, 0))


SQUARE = Heads(4, 4, 4)  # head_dim equal to the head count: a view could spell either


def _per_head(view: list[int], bias_shape: tuple[int, ...]) -> onnx.ModelProto:
    """x @ w_q -> [n, heads, d] -> a view of it; scores + a per-head bias -> Softmax."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w_q"], ["q_flat"], name="/model/layers.0/self_attn/q_proj/MatMul"),
        helper.make_node("Reshape", ["q_flat", "q_shape"], ["q"]),
        helper.make_node("Reshape", ["q", "view"], ["viewed"]),
        helper.make_node("Add", ["scores", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w_q"),
        numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "bias"),
        _ints("q_shape", 0, 4, 4),
        _ints("view", *view),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "heads", 3]),  # the rank feeds its heads
    ]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("viewed", "probs")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _split_heads(proto: onnx.ModelProto, mapping: Mapping) -> Model:
    model = Model.from_onnx(proto)
    rewrite = _Rewrite(model, TPPlan(mapping, SQUARE, ()))
    rewrite.column(next(n for n in model.graph.nodes if n.op == "MatMul"), LayerSplit(Split.COLUMN, Units.Q))
    rewrite.head_tables()
    rewrite.head_views([])
    model.graph.cleanup()
    return model


def test_per_head_bias_and_views_keep_the_ranks_heads() -> None:
    """A per-head bias constant keeps the rank's rows; a view's head count (not its last entry,
    the head size here too) counts the rank's heads."""
    proto = _per_head([-1, 4, 4], (4, 1))
    rng = np.random.default_rng(1)
    x = {
        "x": rng.standard_normal((3, 8)).astype(np.float32),
        "scores": rng.standard_normal((3, 4, 3)).astype(np.float32),
    }
    full = run_ort(proto.SerializeToString(), x)
    for mapping in Mapping.ranks(2):
        heads = SQUARE.q_heads(mapping)
        local = {**x, "scores": x["scores"][:, heads.start : heads.stop]}
        got = run_ort(_split_heads(proto, mapping).to_onnx().SerializeToString(), local)
        assert np.allclose(got["viewed"], full["viewed"][:, heads.start : heads.stop])
        assert np.allclose(got["probs"], full["probs"][:, heads.start : heads.stop])


@pytest.mark.parametrize(
    ("view", "bias", "why"),
    [
        ([-1, 4, 4, 1], (4, 1), "views per-head data with 2 entries equal to the head count"),
        ([-1, 4, 4], (4, 4), "'bias' [4, 4] of an attention score bias has 2 axes of the head count"),
    ],
)
def test_ambiguous_head_counts_are_refused(view: list[int], bias: tuple[int, ...], why: str) -> None:
    with pytest.raises(InputError, match=re.escape(why)):
        _split_heads(_per_head(view, bias), Mapping(2, 0))
