"""Helpers the fusion rules share: ranks, axes, naming, small node builders."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.passes.manager import Model


def rank_of(tensor: gs.Tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    if tensor.shape is None or not -len(tensor.shape) <= axis < len(tensor.shape):
        return None
    dim = tensor.shape[axis]
    return int(dim) if isinstance(dim, (int, np.integer)) else None


def node_axes(node: gs.Node) -> list[int] | None:
    """Axes of a reduction: the attribute (opset < 18) or the constant second input."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)]
    return None


def last_axis_reduction(node: gs.Node, rank: int | None) -> str | None:
    """Why a ReduceMean is not a keepdims reduction over the last axis, or None."""
    axes = node_axes(node)
    if axes is None:
        return f"{node.name}: reduction axes are not constant"
    last = {-1} | ({rank - 1} if rank else set())
    if len(axes) != 1 or axes[0] not in last:
        return f"{node.name}: reduces over axes {axes}, not the last axis"
    if int(node.attrs.get("keepdims", 1)) != 1:
        return f"{node.name}: keepdims=0"
    return None


def _scope(near: gs.Node) -> str:
    """The module scope of a node's name (/model/layers.0/self_attn/Softmax -> /model/layers.0/self_attn)."""
    name = str(near.name)
    return name.rsplit("/", 1)[0] if "/" in name else name


def new_node_name(model: Model, near: gs.Node, op: str) -> str:
    """Name a new node after the one it replaces, so its module path (layer) stays readable."""
    return model.fresh_name(f"{_scope(near)}/{op}")


def make_tensor(
    model: Model, near: gs.Node, label: str, dtype: object = None, shape: list[object] | None = None
) -> gs.Variable:
    return gs.Variable(model.fresh_name(f"{_scope(near)}/{label}_output_0"), dtype=dtype, shape=shape)


def int64(values: list[int], model: Model, label: str) -> gs.Constant:
    return gs.Constant(model.fresh_name(label), np.asarray(values, dtype=np.int64))
