"""Cleanup passes: constant folding, identity and dead-node removal, shape inference."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, numpy_of_onnx, onnx_elem_type
from llm2trt.passes.manager import FileValues, GraphPass, Model, PassResult, gs_quiet, weight_bytes, weightless

logger = logging.getLogger(__name__)

_SHARED_BYTES = 1 << 16  # a shared constant this large is a weight, not shape arithmetic


def _unfoldable(node: gs.Node) -> bool:
    """Nodes ONNX Runtime's CPU provider cannot evaluate (no bfloat16 kernels): one of them would
    fail the whole folding session, shape arithmetic included. The transpose of a weight
    something else also reads (a tied embedding): folding it would store the weight twice. And a
    weight's DequantizeLinear: folded, the weight would be float again."""
    if node.op == "Transpose" and _shared_weight(node.inputs[0]):
        return True
    if node.op == "DequantizeLinear":  # a quantized weight stays quantized (an imported checkpoint's)
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
                _drop_empty_concat_inputs(graph)
                _drop_whole_slices(graph)
                graph.cleanup(remove_unused_graph_inputs=False)
            if len(graph.nodes) == count:
                break
        folded = before - len(graph.nodes)
        return PassResult(modified=folded > 0, counts={"folded_nodes": folded})


def _drop_empty_concat_inputs(graph: gs.Graph) -> int:
    """Drop Concat inputs that are statically empty along the concatenated axis; a Concat left
    with one input goes. Phi-3's apply_rotary_pos_emb concatenates the rotated part with the
    pass-through rest `q[..., rotary_dim:]`, which is 0 wide when the whole head rotates: without
    this, that empty Slice and the Concat stay between RoPE and attention."""
    outputs = {t.name for t in graph.outputs}
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "Concat" or len(node.inputs) < 2 or len(node.outputs) != 1:
            continue
        axis = int(node.attrs.get("axis", 0))
        empty = [t for t in node.inputs if _static_dim(t, axis) == 0]
        if not empty:
            continue
        kept = [t for t in node.inputs if _static_dim(t, axis) != 0] or node.inputs[:1]
        dropped += len(node.inputs) - len(kept)
        node.inputs.clear()
        node.inputs.extend(kept)
        if len(kept) == 1:
            bypass(node, outputs)
    return dropped


def _drop_whole_slices(graph: gs.Graph) -> int:
    """Remove Slices that keep the whole of their input: constant bounds covering every static dim
    they slice, step 1. Phi-3 takes `q[..., :rotary_dim]` whole when the whole head rotates."""
    outputs = {t.name for t in graph.outputs}
    removed = 0
    for node in list(graph.nodes):
        if node.op == "Slice" and len(node.outputs) == 1 and _whole_slice(node) and bypass(node, outputs):
            removed += 1
    return removed


def _whole_slice(node: gs.Node) -> bool:
    data = node.inputs[0]
    if data.shape is None or len(node.inputs) < 3:
        return False
    bounds: list[list[int] | None] = []
    for i in range(1, 5):
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or t.is_empty():
            bounds.append(None)
        elif isinstance(t, gs.Constant):
            bounds.append([int(v) for v in np.asarray(t.values).reshape(-1)])
        else:
            return False
    starts, ends, axes, steps = bounds
    if starts is None or ends is None:
        return False
    rank = len(data.shape)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = _static_dim(data, axis) if -rank <= axis < rank else None
        if dim is None or step != 1 or not (start == 0 or start <= -dim) or end < dim:
            return False
    return True


def _static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = tensor.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


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
        if ttype.HasField("shape"):
            found = [
                d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                for d in ttype.shape.dim
            ]
            shape = _refined(tensor.shape, found)
            if shape is not None:
                tensor.shape = shape
                changed = True
        typed += changed
    return typed, []


def _refined(shape: object, found: list[int | str | None]) -> list[int | str | None] | None:
    """The shape a tensor should record given what inference `found`, or None to keep its own.

    A tensor without a shape takes the inferred one. A shape recorded earlier keeps its dims but
    takes the static ones inference now knows where it had none: folding turns a slice bound into
    a constant, and the slice's output, typed `unk__12` before, is 16 wide now. Without that, the
    shape arithmetic reading that dim (`q_rot.shape[-1] // 2`) would never fold.
    """
    if shape is None:
        return found
    dims = list(shape)  # type: ignore[call-overload]
    if len(dims) != len(found):
        return None
    refined = [f if not isinstance(d, int) and isinstance(f, int) else d for d, f in zip(dims, found, strict=True)]
    return refined if refined != dims else None


class ShapeInference(GraphPass):
    """ONNX shape inference; records dtype and shape on every tensor it can type."""

    name = "shape_inference"

    def run(self, model: Model) -> PassResult:
        typed, notes = infer_shapes(model)
        return PassResult(modified=typed > 0, counts={"typed_tensors": typed}, notes=notes)


def cleanup_passes() -> list[GraphPass]:
    """Cleanup before fusion; ShapeInference goes last in a pipeline, after any fusions."""
    return [ConstantFolding(), IdentityElimination(), CastElimination(), DeadNodeElimination()]
