"""Attention fusion for ALiBi models (BLOOM): baddbmm(alibi, Q, K^T) ... bmm(P, V) -> Attention (opset 23).

BLOOM's eager attention works on (batch*heads, seq, head_dim) views: scores = baddbmm(alibi, q,
k^T, beta, alpha), viewed as (batch, heads, q, k), plus the additive mask (or a masked_fill with
the dtype's lowest value), softmax, viewed back and multiplied by v. The rule proves from the shape
subgraphs that every view only merges or splits (batch, heads) and feeds Attention the 4-D tensors
from before the views. Its attn_mask is the ALiBi term viewed as (batch, heads, 1, keys) plus the
mask; the bias is built once and shared by every layer. The ALiBi term needs no proof of how its
rows were built: the graph adds its row r to score row r, and viewing both as (batch, heads) rows
keeps them together. K and V stay the tensors the cache Concats produce (the present outputs), so
the KV-cache passes see one Attention per layer reading them.

The views are proven through named dims: a dim_param names one value throughout a model (ONNX's
convention, which shape inference keeps: it names each unknown dim apart from those in the graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, onnx_elem_type
from llm2trt.passes.fusions.common import new_node_name, node_axes, rank_of, static_dim
from llm2trt.passes.manager import POSITION_BIAS_KEY, Model
from llm2trt.passes.pattern import AnyOf, Const, Match, Op, Pattern, RewriteRule, Var, is_scalar, scalar

# A dim as a product: its constant factor and the names of its symbolic factors (4 * batch ->
# (4, ("batch",))); -1 in a Reshape target is (-1, ()).
Dim = tuple[int, tuple[str, ...]]
Dims = list[Dim | None]
_INFER: Dim = (-1, ())
_COPY: Dim = (0, ())
# Ops that change neither a tensor's shape nor the order of its elements.
_SAME_LAYOUT = ("Cast", "Identity")


def _dim(value: object) -> Dim | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value), ())
    if isinstance(value, str) and value:
        return (1, (value,))
    return None


def _times(a: Dim | None, b: Dim | None) -> Dim | None:
    if a is None or b is None:
        return None
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def _over(a: Dim | None, b: Dim | None) -> Dim | None:
    """a / b where it divides exactly, else None."""
    if a is None or b is None or b[0] == 0 or a[0] % b[0]:
        return None
    names = list(a[1])
    for name in b[1]:
        if name not in names:
            return None
        names.remove(name)
    return (a[0] // b[0], tuple(names))


def dims_of(tensor: gs.Tensor) -> Dims | None:
    """The tensor's recorded shape as dims (None for an unknown dim), or None without a shape."""
    return [_dim(d) for d in tensor.shape] if tensor.shape is not None else None


def shape_values(tensor: gs.Tensor) -> Dims | None:
    """The entries of a 1-D shape tensor as dims, read from its constant or its shape subgraph
    (Concat of Unsqueezed scalars, Shape, Gather, Mul, Div); None where the structure is unknown."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.ndim > 1 or not np.issubdtype(values.dtype, np.integer):
            return None
        return [(int(v), ()) for v in values.reshape(-1)]
    if not tensor.inputs:
        return None
    node: gs.Node = tensor.inputs[0]
    read = _SHAPE_OPS.get(node.op)
    return read(node) if read is not None else None


def _concat_values(node: gs.Node) -> Dims | None:
    if int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    out: Dims = []
    for piece in node.inputs:
        values = shape_values(piece)
        if values is None:
            return None
        out += values
    return out


def _unsqueeze_values(node: gs.Node) -> Dims | None:
    return [_scalar_value(node.inputs[0])] if node_axes(node) in ([0], [-1]) else None


def _shape_of(node: gs.Node) -> Dims | None:
    source = dims_of(node.inputs[0])
    if source is None:
        return None
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    return source[start : int(end) if end is not None else None]


def _gathered(node: gs.Node) -> tuple[Dims, np.ndarray] | None:
    """The shape values a Gather over axis 0 picks from, and its constant indices."""
    if int(node.attrs.get("axis", 0)) != 0 or not isinstance(node.inputs[1], gs.Constant):
        return None
    source = shape_values(node.inputs[0])
    return (source, np.asarray(node.inputs[1].values).astype(np.int64)) if source is not None else None


def _pick(source: Dims, index: int) -> Dim | None:
    index += len(source) if index < 0 else 0
    return source[index] if 0 <= index < len(source) else None


def _gather_values(node: gs.Node) -> Dims | None:
    gathered = _gathered(node)
    if gathered is None or gathered[1].ndim != 1:
        return None
    source, index = gathered
    return [_pick(source, int(i)) for i in index]


def _passed_on(node: gs.Node) -> Dims | None:
    return shape_values(node.inputs[0])


_SHAPE_OPS: dict[str, Callable[[gs.Node], Dims | None]] = {
    "Concat": _concat_values,
    "Unsqueeze": _unsqueeze_values,
    "Shape": _shape_of,
    "Gather": _gather_values,
    **dict.fromkeys(_SAME_LAYOUT, _passed_on),
}


def _scalar_value(tensor: gs.Tensor) -> Dim | None:
    """A scalar shape computation (Gather of a Shape, Mul, Div, a constant) as a dim."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        integer = values.size == 1 and np.issubdtype(values.dtype, np.integer)
        return (int(values.reshape(-1)[0]), ()) if integer else None
    if not tensor.inputs:
        return None
    node: gs.Node = tensor.inputs[0]
    if node.op == "Gather":
        gathered = _gathered(node)
        return _pick(gathered[0], int(gathered[1].reshape(-1)[0])) if gathered and gathered[1].size == 1 else None
    if node.op == "Mul":
        return _times(_scalar_value(node.inputs[0]), _scalar_value(node.inputs[1]))
    if node.op == "Div":
        return _over(_scalar_value(node.inputs[0]), _scalar_value(node.inputs[1]))
    if node.op in (*_SAME_LAYOUT, "Squeeze"):
        return _scalar_value(node.inputs[0])
    return None


def reshape_target(node: gs.Node) -> Dims | None:
    """A Reshape's target shape as dims, its zeros (copy the input's dim) resolved."""
    target = shape_values(node.inputs[1])
    if target is None:
        return None
    if int(node.attrs.get("allowzero", 0)):
        return target
    source = dims_of(node.inputs[0]) or []
    return [(source[i] if i < len(source) else None) if d == _COPY else d for i, d in enumerate(target)]


def fits(target: Dims | None, expected: Dims) -> bool:
    """`target` (a Reshape's) is `expected`, with at most one entry left to inference (-1)."""
    if target is None or len(target) != len(expected):
        return False
    inferred = 0
    for have, want in zip(target, expected, strict=True):
        if have == _INFER:
            inferred += 1
        elif have is None or have != want:
            return False
    return inferred <= 1


def merges_heads(node: gs.Node, rows: list[Dim | None]) -> bool:
    """The Reshape views (batch, heads, seq, dim) as (rows, seq, dim) with rows one of `rows`:
    batch*heads, so row b*heads + h holds (b, h) as in every other view of the match."""
    source = dims_of(node.inputs[0])
    if source is None or len(source) != 4:
        return False
    target = reshape_target(node)
    return any(fits(target, [r, source[2], source[3]]) for r in rows if r is not None)


def _scaled(tensor: gs.Tensor) -> bool:
    """A Mul by a one-element constant produces the tensor."""
    node = tensor.inputs[0] if tensor.inputs else None
    return (
        node is not None
        and node.op == "Mul"
        and any(isinstance(t, gs.Constant) and np.asarray(t.values).size == 1 for t in node.inputs)
    )


def _same_input(a: gs.Tensor, b: gs.Tensor) -> bool:
    if a is b:
        return True
    if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
        x, y = np.asarray(a.values), np.asarray(b.values)
        return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))
    return False


class AlibiAttentionRule(RewriteRule):
    """BLOOM's eager attention; tried after AttentionRule, whose 4-D pattern it does not overlap."""

    name = "Attention.alibi"
    fusion = "Attention"
    emits = "Attention"
    root: ClassVar[tuple[str, ...]] = ("MatMul",)
    anchor: ClassVar[tuple[str, ...]] = ("Softmax",)
    anchor_depth = 4
    min_opset = 23

    def pattern(self) -> Pattern:
        q3 = Op("Reshape", Var("q"), Var("q_shape"), name="q_view")
        kt3 = Op("Transpose", Op("Reshape", Var("k"), Var("k_shape"), name="k_view"), name="k_t")
        v3 = Op("Reshape", Var("v"), Var("v_shape"), name="v_view")
        scores = Op("MatMul", q3, kt3, name="qk")
        scaled = AnyOf(
            [
                Op("Mul", scores, Const("s_mul", is_scalar())),
                Op("Div", scores, Const("s_div", is_scalar())),
                scores,
            ]
        )
        # beta * alibi, or alibi alone where it is no product with a scalar (one match, one reason).
        alibi = AnyOf(
            [
                Op("Mul", Var("alibi"), Const("beta", is_scalar()), name="beta_mul"),
                Var("alibi", where=lambda t: not _scaled(t)),
            ]
        )
        scores4 = Op("Reshape", Op("Add", scaled, alibi, name="alibi_add"), Var("split_shape"), name="split")
        masked = AnyOf(
            [
                Op("Add", scores4, Var("mask"), name="mask_add"),
                Op("Where", Var("cond"), Const("fill", is_scalar()), scores4, name="mask_fill"),
                scores4,
            ]
        )
        pre = AnyOf([Op("Cast", masked, name="cast_in"), masked])
        probs = Op("Softmax", pre, name="softmax")
        # TorchScript exports softmax(x, dtype=float32).to(x.dtype) as Softmax in x's type, then a
        # round trip through fp32 that changes nothing: the graph's softmax is in x's type.
        post = AnyOf(
            [
                Op("Cast", Op("Cast", probs, name="cast_up"), name="cast_down"),
                Op("Cast", probs, name="cast_out"),
                probs,
            ]
        )
        merged = Op("Reshape", post, Var("merge_shape"), name="merge")
        return Op("MatMul", merged, v3, name="pv")

    def scale(self, m: Match) -> float:
        if "s_mul" in m.tensors:
            return scalar(m.const("s_mul")) or 1.0
        if "s_div" in m.tensors:
            return 1.0 / (scalar(m.const("s_div")) or 1.0)
        return 1.0

    def check(self, m: Match, model: Model) -> str | None:
        axis = int(m.nodes["softmax"].attrs.get("axis", -1))
        if axis not in (-1, 3):
            return f"softmax over axis {axis}, not the key axis"
        if static_dim(m.tensors["q"], 1) is None:
            return "the query's head count is not static (the bias is viewed per head)"
        return (
            self._check_operands(m)
            or self._check_views(m)
            or self._check_bias(m)
            or self._check_casts(m)
            or self._check_scale(m)
        )

    def _check_operands(self, m: Match) -> str | None:
        q, k, v = m.tensors["q"], m.tensors["k"], m.tensors["v"]
        for label, t in (("Q", q), ("K", k), ("V", v)):
            if rank_of(t) != 4:
                return f"{label} {t.name!r} has rank {rank_of(t)}, expected 4 (batch, heads, seq, dim) before its view"
        heads = static_dim(q, 1)
        if heads is None:
            return f"Q {q.name!r} has no static number of heads"
        for label, t in (("K", k), ("V", v)):
            if static_dim(t, 1) != heads:
                return f"{label} {t.name!r} has {static_dim(t, 1)} heads, Q has {heads}"
        qd, kd, vd = (dims_of(t) or [None] * 4 for t in (q, k, v))
        if qd[3] is None or kd[3] != qd[3] or vd[3] != qd[3]:
            return f"head sizes differ or are unknown: Q {q.shape}, K {k.shape}, V {v.shape}"
        perm = m.nodes["k_t"].attrs.get("perm")
        if perm is None or list(perm) != [0, 2, 1]:
            return f"K is transposed by {perm}, not (0, 2, 1)"
        return None

    def _check_views(self, m: Match) -> str | None:
        """Every Reshape of the match only merges or splits (batch, heads)."""
        qd, kd = dims_of(m.tensors["q"]) or [None] * 4, dims_of(m.tensors["k"]) or [None] * 4
        rows = _times(qd[0], qd[1])
        if not merges_heads(m.nodes["q_view"], [rows]):
            return f"cannot prove that {m.nodes['q_view'].name} views Q as (batch*heads, seq, dim)"
        # K and V may have lost the batch's name on the way (a dim shape inference could not
        # follow): the same row count as Q's view then says it, and K/V with another batch than Q
        # would fail in the fused op, not compute something else.
        q_target = reshape_target(m.nodes["q_view"]) or [None]
        same_rows = [rows] + ([q_target[0]] if q_target[0] != _INFER else [])
        for label in ("k", "v"):
            if not merges_heads(m.nodes[f"{label}_view"], same_rows):
                return f"cannot prove that {m.nodes[f'{label}_view'].name} views {label.upper()} like Q"
        if not fits(reshape_target(m.nodes["split"]), [qd[0], qd[1], qd[2], kd[2]]):
            return f"cannot prove that {m.nodes['split'].name} views the scores as (batch, heads, q, keys)"
        if not any(fits(reshape_target(m.nodes["merge"]), [r, qd[2], kd[2]]) for r in same_rows):
            return f"cannot prove that {m.nodes['merge'].name} views the probabilities as (batch*heads, q, keys)"
        return None

    def _check_bias(self, m: Match) -> str | None:
        q, alibi = m.tensors["q"], m.tensors["alibi"]
        q_type = onnx_elem_type(q.dtype)
        if rank_of(alibi) != 3:
            return f"ALiBi term {alibi.name!r} has rank {rank_of(alibi)}, expected 3 (batch*heads, 1, keys)"
        for label, t in (("ALiBi term", alibi), ("mask", m.tensors.get("mask"))):
            if t is None:
                continue
            t_type = onnx_elem_type(t.dtype)
            if t_type is not None and q_type is not None and t_type != q_type:
                return f"{label} {t.name!r} dtype {t.dtype} differs from Q dtype {q.dtype}"
        if "mask" in m.tensors and rank_of(m.tensors["mask"]) not in (2, 3, 4):
            return f"mask {m.tensors['mask'].name!r} has rank {rank_of(m.tensors['mask'])}"
        if "fill" in m.tensors:
            # masked_fill becomes an additive mask: exact in fp32 (scores vanish next to the
            # lowest value), but in fp16 a fully masked row could overflow to -inf.
            if q_type != DType.FP32.onnx:
                return "masked_fill as an additive mask is exact in fp32 only"
            fill = scalar(m.const("fill"))
            if fill is None or fill > float(np.finfo(np.float32).min) / 2:
                return f"masked_fill value {fill} is not the dtype's lowest value"
        return None

    def _check_casts(self, m: Match) -> str | None:
        fp32, nodes = DType.FP32.onnx, m.nodes
        if ("cast_in" in nodes or "cast_out" in nodes) and (
            "cast_in" not in nodes or "cast_out" not in nodes or nodes["cast_in"].attrs.get("to") != fp32
        ):
            return "softmax is wrapped in casts other than an fp32 round trip"
        back = onnx_elem_type(m.tensors["q"].dtype)
        if "cast_up" in nodes and (
            nodes["cast_up"].attrs.get("to") != fp32 or nodes["cast_down"].attrs.get("to") != back
        ):
            return "the softmax output is cast to types other than fp32 and back"
        return None

    def _check_scale(self, m: Match) -> str | None:
        scale = self.scale(m)
        if not np.isfinite(scale) or scale <= 0:
            return f"scale {scale} is not a positive number"
        return None

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        nodes: list[gs.Node] = []
        q = m.tensors["q"]
        heads = static_dim(q, 1) or 0  # static: check() refuses otherwise
        bias, alibi = self._bias(m, model, nodes, heads)
        attrs: dict[str, object] = {"scale": float(self.scale(m)), "is_causal": 0}
        if "cast_in" in m.nodes:
            attrs["softmax_precision"] = DType.FP32.onnx
        anchor = m.nodes["softmax"]
        context = gs.Variable(model.fresh_name(f"{anchor.name}_context"), dtype=q.dtype)
        name = new_node_name(model, anchor, self.emits)
        model.node_metadata.setdefault(name, {})[POSITION_BIAS_KEY] = alibi.name
        nodes.append(
            gs.Node(
                self.emits,
                name,
                attrs=attrs,
                inputs=[q, m.tensors["k"], m.tensors["v"], bias],
                outputs=[context],
            )
        )
        # The graph goes on from the (batch*heads, seq, dim) view, which Q's own view target gives.
        nodes.append(
            gs.Node(
                "Reshape",
                new_node_name(model, m.nodes["pv"], "Reshape_context"),
                inputs=[context, m.tensors["q_shape"]],
                outputs=[out],
            )
        )
        return nodes

    def _bias(self, m: Match, model: Model, nodes: list[gs.Node], heads: int) -> tuple[gs.Tensor, gs.Tensor]:
        """ALiBi viewed as (batch, heads, 1, keys), plus the mask: the same in every layer, made once.
        Also returns the ALiBi term alone (what a pass replacing the mask must keep)."""
        alibi = m.tensors["alibi"]
        dtype = alibi.dtype
        beta = scalar(m.const("beta")) if "beta" in m.tensors else 1.0
        if beta != 1.0:
            alibi = self._shared(model, nodes, "Mul", [alibi, m.tensors["beta"]], dtype=dtype)
        if static_dim(alibi, 0) == 1:  # one row for every (batch, head): broadcast
            axes = gs.Constant(model.fresh_name("/alibi/axes"), np.asarray([0], dtype=np.int64))
            alibi4 = self._shared(model, nodes, "Unsqueeze", [alibi, axes], dtype=dtype)
        else:
            tail = self._shared(model, nodes, "Shape", [alibi], {"start": 1}, dtype=np.int64)
            lead = gs.Constant(model.fresh_name("/alibi/batch_heads"), np.asarray([-1, heads], dtype=np.int64))
            shape = self._shared(model, nodes, "Concat", [lead, tail], {"axis": 0}, dtype=np.int64)
            alibi4 = self._shared(model, nodes, "Reshape", [alibi, shape], dtype=dtype)
        if "mask" in m.tensors:
            bias = self._shared(model, nodes, "Add", [alibi4, m.tensors["mask"]], dtype=dtype)
        elif "cond" in m.tensors:
            zero = gs.Constant(model.fresh_name("/alibi/zero"), np.zeros((), dtype=np.asarray(m.const("fill")).dtype))
            fill = self._shared(model, nodes, "Where", [m.tensors["cond"], m.tensors["fill"], zero], dtype=dtype)
            bias = self._shared(model, nodes, "Add", [alibi4, fill], dtype=dtype)
        else:
            bias = alibi4
        if not self._has_query_rows(m):
            # ONNX Runtime takes an attn_mask with one row per query only (no broadcast over them).
            q = m.tensors["q"]
            rows = self._shared(model, nodes, "Shape", [q], {"start": 2, "end": 3}, dtype=np.int64)
            ones = gs.Constant(model.fresh_name("/alibi/ones"), np.ones(2, dtype=np.int64))
            one = gs.Constant(model.fresh_name("/alibi/one"), np.ones(1, dtype=np.int64))
            shape = self._shared(model, nodes, "Concat", [ones, rows, one], {"axis": 0}, dtype=np.int64)
            bias = self._shared(model, nodes, "Expand", [bias, shape], dtype=dtype)
        return bias, alibi4

    @staticmethod
    def _has_query_rows(m: Match) -> bool:
        """Whether the bias already has a row per query: the ALiBi term's or the mask's rows are
        the queries, or neither is known to broadcast (a mask of one row fails loudly then)."""
        queries = (dims_of(m.tensors["q"]) or [None] * 4)[2]
        for name in ("alibi", "mask", "cond"):
            t = m.tensors.get(name)
            rows = (dims_of(t) or [None])[-2] if t is not None and (rank_of(t) or 0) >= 2 else None
            if rows is not None and rows == queries:
                return True
        masks = [m.tensors[n] for n in ("mask", "cond") if n in m.tensors]
        return bool(masks) and all(static_dim(t, -2) != 1 for t in masks if (rank_of(t) or 0) >= 2)

    def _shared(
        self,
        model: Model,
        nodes: list[gs.Node],
        op: str,
        inputs: list[gs.Tensor],
        attrs: dict[str, object] | None = None,
        dtype: object = None,
    ) -> gs.Variable:
        """op(inputs), or the same node an earlier match of this rule made."""
        attrs = attrs or {}
        variable = next(t for t in inputs if not isinstance(t, gs.Constant))
        for node in variable.outputs:
            if (
                node.op == op
                and model.rule_of(node) == self.name
                and dict(node.attrs) == attrs
                and len(node.inputs) == len(inputs)
                and all(_same_input(a, b) for a, b in zip(node.inputs, inputs, strict=True))
            ):
                return node.outputs[0]
        out = gs.Variable(model.fresh_name(f"/alibi/{op}_output_0"), dtype=dtype)
        nodes.append(gs.Node(op, model.fresh_name(f"/alibi/{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
        return out


__all__ = ["AlibiAttentionRule", "dims_of", "fits", "merges_heads", "shape_values"]
