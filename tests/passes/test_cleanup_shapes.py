"""Cleanup that exposes fusable patterns: shape arithmetic over dims that become static only after
an earlier fold, Concat operands that are statically empty, and Slices that keep everything.

Phi-3's rotary code slices q by `cos.shape[-1]` and rotate_half by `x.shape[-1] // 2` of that
slice, and concatenates the rotated part with a pass-through rest that is empty when the whole head
rotates; each of these would keep the RoPE fusion and GroupQueryAttention from matching."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from llm2trt.core.numerics import run_ort
from llm2trt.passes.cleanup import ConstantFolding, infer_shapes
from llm2trt.passes.manager import Model

BIG = np.iinfo(np.int64).max


def _ints(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: list[object], y: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _rotate_half_by_shapes() -> onnx.ModelProto:
    """q_rot = x[..., :table.shape[-1]]; rotate_half(q_rot) with its half from q_rot's own shape."""
    nodes = [
        helper.make_node("Shape", ["table"], ["table_shape"]),
        helper.make_node("Gather", ["table_shape", "minus1"], ["rot_dim"], axis=0),
        helper.make_node("Unsqueeze", ["rot_dim", "axis0"], ["rot_end"]),
        helper.make_node("Slice", ["x", "zero", "rot_end", "last"], ["q_rot"]),
        helper.make_node("Shape", ["q_rot"], ["rot_shape"]),
        helper.make_node("Gather", ["rot_shape", "minus1"], ["width"], axis=0),
        helper.make_node("Div", ["width", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "axis0"], ["half1"]),
        helper.make_node("Slice", ["q_rot", "zero", "half1", "last"], ["x1"]),
        helper.make_node("Slice", ["q_rot", "half1", "big", "last"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["neg"]),
        helper.make_node("Concat", ["neg", "x1"], ["y"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.zeros((1, 1, 8), dtype=np.float32), "table"),
        numpy_helper.from_array(np.asarray(-1, dtype=np.int64), "minus1"),
        numpy_helper.from_array(np.asarray(2, dtype=np.int64), "two"),
        _ints("axis0", 0),
        _ints("zero", 0),
        _ints("last", -1),
        _ints("big", BIG),
    ]
    return _graph(nodes, inits, ["batch", 4, "seq", 8], "y")


def test_shapes_of_slices_refine_after_their_bounds_fold() -> None:
    proto = _rotate_half_by_shapes()
    model = Model.from_onnx(proto)
    result = ConstantFolding().run(model)
    ops = [n.op for n in model.graph.nodes]
    # All shape arithmetic folded (q_rot's width is 8 once its end is the constant 8); the
    # rotate_half slices have constant bounds, and the slice that keeps all of x is gone.
    assert ops == ["Slice", "Slice", "Neg", "Concat"], ops
    assert result.counts["folded_nodes"] == 8
    for node in model.graph.nodes:
        if node.op == "Slice":
            assert all(isinstance(t, gs.Constant) for t in node.inputs[1:])
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 8)).astype(np.float32)
    want = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    got = run_ort(model.to_onnx().SerializeToString(), {"x": x})["y"]
    assert np.array_equal(got, want)


def test_inferred_static_dims_replace_unknown_ones() -> None:
    nodes = [
        helper.make_node("Slice", ["x", "zero", "eight", "last"], ["q_rot"]),
        helper.make_node("Relu", ["q_rot"], ["y"]),
    ]
    inits = [_ints("zero", 0), _ints("eight", 8), _ints("last", -1)]
    model = Model.from_onnx(_graph(nodes, inits, ["batch", 4, "seq", 16], "y"))
    tensors = model.graph.tensors()
    tensors["q_rot"].shape = ["batch", "unk__1", "seq", "unk__2"]  # typed before its bound folded
    infer_shapes(model)
    # A static dim replaces an unknown one; the named dims stay as they were.
    assert tensors["q_rot"].shape == ["batch", 4, "seq", 8]


def test_empty_concat_operands_and_whole_slices_go() -> None:
    # Phi-3 at partial_rotary_factor 1: cat([rope(x[..., :16]), x[..., 16:]]) with x 16 wide.
    nodes = [
        helper.make_node("Slice", ["x", "zero", "sixteen", "last"], ["rot"]),
        helper.make_node("Slice", ["x", "sixteen", "big", "last"], ["rest"]),
        helper.make_node("Relu", ["rot"], ["rotated"]),
        helper.make_node("Concat", ["rotated", "rest"], ["y"], axis=-1),
    ]
    inits = [_ints("zero", 0), _ints("sixteen", 16), _ints("last", -1), _ints("big", BIG)]
    proto = _graph(nodes, inits, ["batch", 2, "seq", 16], "y")
    model = Model.from_onnx(proto)
    ConstantFolding().run(model)
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert model.graph.outputs[0].name == "y"  # the graph output keeps its name
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 16)).astype(np.float32)
    got = run_ort(model.to_onnx().SerializeToString(), {"x": x})["y"]
    assert np.array_equal(got, np.maximum(x, 0))


def test_partial_slices_and_full_concats_stay() -> None:
    # Partial rotary (rotary_dim 8 of 16): both parts are real, nothing to drop.
    nodes = [
        helper.make_node("Slice", ["x", "zero", "eight", "last"], ["rot"]),
        helper.make_node("Slice", ["x", "eight", "big", "last"], ["rest"]),
        helper.make_node("Relu", ["rot"], ["rotated"]),
        helper.make_node("Concat", ["rotated", "rest"], ["y"], axis=-1),
    ]
    inits = [_ints("zero", 0), _ints("eight", 8), _ints("last", -1), _ints("big", BIG)]
    model = Model.from_onnx(_graph(nodes, inits, ["batch", 2, "seq", 16], "y"))
    ConstantFolding().run(model)
    assert sorted(n.op for n in model.graph.nodes) == ["Concat", "Relu", "Slice", "Slice"]
