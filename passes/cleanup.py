"""Cleanup passes: constant folding, identity and dead-node removal, shape inference."""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, numpy_of_onnx, onnx_elem_type
from llm2trt.passes.manager import FileValues, GraphPass, Model, PassResult, gs_quiet, weight_bytes, weightless

logger = logging.getLogger(__name__)

_SHARED_BYTES = 1 << 16  # a shared constant this large is a weight, not shape arithmetic


def _unfoldable(node: gs.Node) -> bool:
    """Nodes ONNX Runtime's CPU provider cannot evaluate (no bfloat16 kernels): one of them would
    fail the whole folding session, shape arithmetic included. And the transpose of a weight
    something else also reads (a tied embedding): folding it would store the weight twice."""
    if node.op == "Transpose" and _shared_weight(node.inputs[0]):
        return True
    return any(onnx_elem_type(t.dtype) == DType.BF16.onnx for t in [*node.inputs, *node.outputs])


def _shared_weight(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and len(tensor.outputs) > 1 and weight_bytes(tensor) >= _SHARED_BYTES


def _read_foldable(graph: gs.Graph) -> None:
    """Read the on-disk weights folding will evaluate (ONNX Runtime gets the folded subgraph without
    its artifact directory): those of nodes whose inputs are all constant, and Constant nodes'."""
    for node in graph.nodes:
        if node.op == "Constant":
            tensors = [a for a in node.attrs.values() if isinstance(a, gs.Constant)]
        elif node.inputs and all(isinstance(t, gs.Constant) for t in node.inputs) and not _unfoldable(node):
            tensors = list(node.inputs)
        else:
            continue
        for tensor in tensors:
            if isinstance(tensor._values, FileValues):
                tensor.values = tensor._values.load()


class ConstantFolding(GraphPass):
    """Evaluate everything that does not depend on graph inputs, shape arithmetic included.

    Static dims (head size, hidden size) are only foldable once shapes are inferred, and folding
    exposes more of them: infer and fold until nothing changes.
    """

    name = "constant_folding"
    max_rounds = 4

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        before = len(graph.nodes)
        for _ in range(self.max_rounds):
            count = len(graph.nodes)
            infer_shapes(model)
            _read_foldable(graph)
            with gs_quiet():
                graph.fold_constants(fold_shapes=True, error_ok=True, should_exclude_node=_unfoldable)
                graph.cleanup(remove_unused_graph_inputs=False)
            if len(graph.nodes) == count:
                break
        folded = before - len(graph.nodes)
        return PassResult(modified=folded > 0, counts={"folded_nodes": folded})


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads `old` read `new` instead."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def bypass(node: gs.Node, graph_outputs: set[str]) -> bool:
    """Take a one-input, one-output node that changes nothing out of the graph; False if it must stay."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst.name in graph_outputs:
        producer = src.inputs[0] if src.inputs else None
        if producer is None or src.name in graph_outputs:
            return False  # the graph output needs a producer of its own
        # Keep the graph output's name: the producer writes it directly.
        node.outputs.clear()
        replace_uses(src, dst)
        producer.outputs[producer.outputs.index(src)] = dst
    else:
        replace_uses(dst, src)
        node.outputs.clear()
    node.inputs.clear()
    return True


class _BypassPass(GraphPass):
    """Remove every node `removable` accepts, wiring its consumers to its input."""

    counter: ClassVar[str]

    def removable(self, node: gs.Node) -> bool:
        raise NotImplementedError

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        outputs = {t.name for t in graph.outputs}
        removed = sum(
            1
            for node in list(graph.nodes)
            if len(node.inputs) == 1 and len(node.outputs) == 1 and self.removable(node) and bypass(node, outputs)
        )
        if removed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(modified=removed > 0, counts={self.counter: removed})


class IdentityElimination(_BypassPass):
    """Drop Identity nodes."""

    name = "identity_elimination"
    counter = "identities_removed"

    def removable(self, node: gs.Node) -> bool:
        return bool(node.op == "Identity")


class CastElimination(_BypassPass):
    """Drop Casts to the type their input already has (transformers' upcasts, in fp32 graphs)."""

    name = "cast_elimination"
    counter = "casts_removed"
    runs_after: ClassVar[tuple[str, ...]] = ("constant_folding",)

    def removable(self, node: gs.Node) -> bool:
        dtype = onnx_elem_type(node.inputs[0].dtype)
        return node.op == "Cast" and dtype is not None and dtype == node.attrs.get("to")


class DeadNodeElimination(GraphPass):
    """Remove nodes and weights nothing reads."""

    name = "dead_node_elimination"
    runs_after: ClassVar[tuple[str, ...]] = ("constant_folding", "identity_elimination", "cast_elimination")

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        nodes = len(graph.nodes)
        weights = sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
        graph.cleanup(remove_unused_graph_inputs=False)
        removed_nodes = nodes - len(graph.nodes)
        removed_weights = weights - sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
        return PassResult(
            modified=bool(removed_nodes or removed_weights),
            counts={"nodes_removed": removed_nodes, "weights_removed": removed_weights},
        )


def infer_shapes(model: Model) -> tuple[int, list[str]]:
    """ONNX shape inference over the graph; records dtype and shape on tensors that had none."""
    graph = model.graph
    proto, _ = weightless(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        return 0, [f"shape inference failed: {exc}"]
    tensors = graph.tensors()
    typed = 0
    for info in inferred.graph.value_info:
        tensor = tensors.get(info.name)
        if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
            continue
        ttype = info.type.tensor_type
        changed = False
        if tensor.dtype is None and ttype.elem_type:
            tensor.dtype = numpy_of_onnx(ttype.elem_type)
            changed = True
        if tensor.shape is None and ttype.HasField("shape"):
            tensor.shape = [
                d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                for d in ttype.shape.dim
            ]
            changed = True
        typed += changed
    return typed, []


class ShapeInference(GraphPass):
    """ONNX shape inference; records dtype and shape on every tensor it can type."""

    name = "shape_inference"

    def run(self, model: Model) -> PassResult:
        typed, notes = infer_shapes(model)
        return PassResult(modified=typed > 0, counts={"typed_tensors": typed}, notes=notes)


def cleanup_passes() -> list[GraphPass]:
    """Cleanup before fusion; ShapeInference goes last in a pipeline, after any fusions."""
    return [ConstantFolding(), IdentityElimination(), CastElimination(), DeadNodeElimination()]
