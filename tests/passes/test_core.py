"""Pass manager and cleanup passes on tiny hand-built graphs: op lists, counts, numerics."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.passes.cleanup import ConstantFolding, DeadNodeElimination, IdentityElimination, ShapeInference
from llm2trt.passes.manager import GraphPass, Model, PassCheckError, PassManager, PassResult


def _model() -> onnx.ModelProto:
    """y = (x + Identity(Transpose(W)^T)) * (2 * 3), plus a dead branch."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "W")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    nodes = [
        helper.make_node("Transpose", ["W"], ["wt"], name="t1"),
        helper.make_node("Transpose", ["wt"], ["w2"], name="t2"),
        helper.make_node("Identity", ["w2"], ["w3"], name="id"),
        helper.make_node("Mul", ["two", "three"], ["six"], name="mul_const"),
        helper.make_node("Add", ["x", "w3"], ["s"], name="add"),
        helper.make_node("Mul", ["s", "six"], ["y"], name="mul"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w, two, three],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_cleanup_pipeline_counts_and_op_list() -> None:
    proto = _model()
    model = Model.from_onnx(proto)
    result = PassManager([ConstantFolding(), IdentityElimination(), DeadNodeElimination(), ShapeInference()]).run(model)
    counts = {r.name: r.counts for r in result.records}
    # t1, t2, id and mul_const fold away; dead_relu goes with them (nothing reads it).
    assert counts["constant_folding"] == {"folded_nodes": 5}
    assert counts["identity_elimination"] == {"identities_removed": 0}
    assert counts["dead_node_elimination"] == {"nodes_removed": 0, "weights_removed": 0}
    # Constant folding infers shapes before it folds, so the last pass finds nothing left to type.
    assert counts["shape_inference"]["typed_tensors"] == 0
    assert all(t.dtype == np.float32 for t in model.graph.tensors().values())
    assert [n.op for n in model.graph.nodes] == ["Add", "Mul"]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    before = run_ort(proto.SerializeToString(), {"x": x})["y"]
    after = run_ort(model.to_onnx().SerializeToString(), {"x": x})["y"]
    assert normwise_rel_err(after, before) == 0.0


def test_identity_elimination_keeps_graph_output_names() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
        helper.make_node("Identity", ["x"], ["x2"], name="id2"),
        helper.make_node("Add", ["x2", "y"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2]),
        ],
    )
    model = Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = IdentityElimination().run(model)
    assert result.counts == {"identities_removed": 2}
    assert [n.op for n in model.graph.nodes] == ["Relu", "Add"]
    assert [t.name for t in model.graph.outputs] == ["y", "z"]
    assert model.graph.nodes[0].outputs[0].name == "y"


class _Breaker(GraphPass):
    """A buggy pass: it drops the producer of a tensor that is still read."""

    name = "breaker"

    def run(self, model: Model) -> PassResult:
        model.graph.nodes.pop(0)
        return PassResult(modified=True, counts={"broken": 1})


class _Late(GraphPass):
    name = "late"
    runs_after: ClassVar[tuple[str, ...]] = ("constant_folding",)

    def run(self, model: Model) -> PassResult:
        return PassResult(modified=False)


def test_check_after_each_pass_names_the_culprit() -> None:
    model = Model.from_onnx(_model())
    with pytest.raises(PassCheckError, match=r"after pass 'breaker' \(passes run: identity_elimination, breaker\)"):
        PassManager([IdentityElimination(), _Breaker()]).run(model)


def test_ordering_constraints_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="'late' must run after 'constant_folding'"):
        PassManager([_Late(), ConstantFolding()])
    with pytest.raises(ValueError, match="appears twice"):
        PassManager([ConstantFolding(), ConstantFolding()])
    PassManager([ConstantFolding(), _Late()])  # the right order is accepted


def test_check_rejects_ops_beyond_the_opset() -> None:
    model = Model.from_onnx(_model())
    x = model.graph.inputs[0]
    out = gs.Variable("n_out", dtype=np.float32)
    scale = gs.Constant("scale", np.ones(4, dtype=np.float32))
    model.graph.nodes.append(gs.Node("RMSNormalization", "rms", inputs=[x, scale], outputs=[out]))
    model.graph.outputs.append(out)
    from llm2trt.passes.manager import check_graph

    with pytest.raises(PassCheckError, match="RMSNormalization is not an ONNX op at opset 17"):
        check_graph(model)


def test_node_metadata_survives_the_round_trip() -> None:
    proto = _model()
    entry = proto.graph.node[4].metadata_props.add()
    entry.key, entry.value = "namespace", "layer0"
    model = Model.from_onnx(proto)
    model.tag(model.graph.nodes[5], "SomeRule")
    out = model.to_onnx()
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in out.graph.node}
    assert meta["add"] == {"namespace": "layer0"}
    assert meta["mul"] == {"llm2trt.rule": "SomeRule"}
