"""Attention fusion: softmax(Q K^T * scale + mask) V -> Attention (opset 23).

One rule covers what transformers' eager and sdpa paths export: the scale applied to Q and K^T
separately (sdpa: sqrt(scale) on each), to the scores (eager: Mul or Div), or folded into the Q
weights (no scale node: scale 1); an additive mask or none (encoders, vision); an fp32 softmax
between casts in fp16 graphs (-> softmax_precision); and GQA's repeat_kv (Unsqueeze, Expand,
Reshape), which is undone because Attention takes K/V with fewer heads than Q directly.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, onnx_elem_type
from llm2trt.passes.fusions.common import make_tensor, new_node_name, node_axes, rank_of, static_dim
from llm2trt.passes.manager import Model
from llm2trt.passes.pattern import AnyOf, Const, Match, Op, Pattern, RewriteRule, Var, is_scalar, scalar

_SWAP_LAST = (0, 1, 3, 2)


def _compose(perm: list[int]) -> list[int]:
    """The permutation giving K from the tensor that Transpose(perm) turned into K^T."""
    return [perm[i] for i in _SWAP_LAST]


def strip_repeat_kv(t: gs.Tensor) -> gs.Tensor:
    """The (batch, kv_heads, seq, dim) tensor before transformers' repeat_kv, or `t` itself."""
    if not t.inputs or t.inputs[0].op != "Reshape":
        return t
    expand = t.inputs[0].inputs[0]
    if not expand.inputs or expand.inputs[0].op != "Expand":
        return t
    unsqueezed = expand.inputs[0].inputs[0]
    if not unsqueezed.inputs or unsqueezed.inputs[0].op != "Unsqueeze":
        return t
    node = unsqueezed.inputs[0]
    if node_axes(node) != [2]:
        return t
    source: gs.Tensor = node.inputs[0]
    return source if rank_of(source) in (4, None) else t


class AttentionRule(RewriteRule):
    name = "Attention.matmul_softmax"
    fusion = "Attention"
    emits = "Attention"
    root: ClassVar[tuple[str, ...]] = ("MatMul",)
    anchor: ClassVar[tuple[str, ...]] = ("Softmax",)
    anchor_depth = 3
    min_opset = 23

    def pattern(self) -> Pattern:
        q, kt = Var("q"), Var("kt")
        q_scaled = AnyOf([Op("Mul", q, Const("q_scale", is_scalar())), q])
        kt_scaled = AnyOf([Op("Mul", kt, Const("k_scale", is_scalar())), kt])
        scores = Op("MatMul", q_scaled, kt_scaled, name="qk")
        scaled = AnyOf(
            [
                Op("Mul", scores, Const("s_mul", is_scalar())),
                Op("Div", scores, Const("s_div", is_scalar())),
                scores,
            ]
        )
        masked = AnyOf([Op("Add", scaled, Var("mask"), name="mask_add"), scaled])
        pre = AnyOf([Op("Cast", masked, name="cast_in"), masked])
        probs = Op("Softmax", pre, name="softmax")
        post = AnyOf([Op("Cast", probs, name="cast_out"), probs])
        return Op("MatMul", post, Var("v"), name="pv")

    def scale(self, m: Match) -> float:
        value = 1.0
        for name in ("q_scale", "k_scale", "s_mul"):
            if name in m.tensors:
                value *= scalar(m.const(name)) or 1.0
        if "s_div" in m.tensors:
            value /= scalar(m.const("s_div")) or 1.0
        return value

    def check(self, m: Match, model: Model) -> str | None:
        q, kt, v = m.tensors["q"], m.tensors["kt"], m.tensors["v"]
        for label, t in (("Q", q), ("K^T", kt), ("V", v)):
            if rank_of(t) != 4:
                return f"{label} {t.name!r} has rank {rank_of(t)}, expected 4 (batch, heads, seq, dim)"
        head, k_head = static_dim(q, 3), static_dim(kt, 2)
        if head is not None and k_head is not None and head != k_head:
            return f"Q head size {head} differs from K head size {k_head}"
        axis = int(m.nodes["softmax"].attrs.get("axis", -1))
        if axis not in (-1, 3):
            return f"softmax over axis {axis}, not the key axis"
        if "mask" in m.tensors:
            mask = m.tensors["mask"]
            if rank_of(mask) not in (2, 3, 4):
                return f"mask {mask.name!r} has rank {rank_of(mask)}"
            mask_type, q_type = onnx_elem_type(mask.dtype), onnx_elem_type(q.dtype)
            if mask_type is not None and q_type is not None and mask_type != q_type:
                return f"additive mask dtype {mask.dtype} differs from Q dtype {q.dtype}"
        casts = [n for n in ("cast_in", "cast_out") if n in m.nodes]
        if casts and (len(casts) != 2 or m.nodes["cast_in"].attrs.get("to") != DType.FP32.onnx):
            return "softmax is wrapped in casts other than an fp32 round trip"
        if not np.isfinite(self.scale(m)) or self.scale(m) <= 0:
            return f"scale {self.scale(m)} is not a positive number"
        return None

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        nodes: list[gs.Node] = []
        # K^T = Transpose(source, perm): K is Transpose(source, perm with the last two swapped).
        kt = m.tensors["kt"]
        producer = kt.inputs[0] if kt.inputs else None
        if producer is not None and producer.op == "Transpose" and "perm" in producer.attrs:
            key_source, perm = producer.inputs[0], _compose(list(producer.attrs["perm"]))
        else:
            key_source, perm = kt, list(_SWAP_LAST)
        value = m.tensors["v"]
        # GQA: undo repeat_kv on both K and V, or on neither.
        key_kv, value_kv = strip_repeat_kv(key_source), strip_repeat_kv(value)
        if (key_kv is key_source) == (value_kv is value):
            key_source, value = key_kv, value_kv
        if perm == [0, 1, 2, 3]:
            key = key_source
        else:
            key = make_tensor(model, m.nodes["qk"], "key_bhsd", dtype=key_source.dtype)
            nodes.append(
                gs.Node(
                    "Transpose",
                    new_node_name(model, m.nodes["qk"], "Transpose_key"),
                    attrs={"perm": perm},
                    inputs=[key_source],
                    outputs=[key],
                )
            )
        inputs = [m.tensors["q"], key, value] + ([m.tensors["mask"]] if "mask" in m.tensors else [])
        attrs: dict[str, object] = {"scale": float(self.scale(m)), "is_causal": 0}
        if "cast_in" in m.nodes:
            attrs["softmax_precision"] = DType.FP32.onnx
        nodes.append(
            gs.Node(
                self.emits,
                new_node_name(model, m.nodes["softmax"], self.emits),
                attrs=attrs,
                inputs=inputs,
                outputs=[out],
            )
        )
        return nodes
