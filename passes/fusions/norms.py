"""LayerNorm and RMSNorm fusions: decomposed normalizations to LayerNormalization / RMSNormalization."""

from __future__ import annotations

from typing import ClassVar

import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, onnx_elem_type
from llm2trt.passes.fusions.common import last_axis_reduction, new_node_name, rank_of
from llm2trt.passes.manager import Model
from llm2trt.passes.pattern import AnyOf, Const, Match, Op, Pattern, RewriteRule, Var, is_scalar, scalar


def _reduce_mean(x: Pattern, name: str) -> Op:
    # Opset 17 carries axes as an attribute, 18+ as a second input: accept both.
    return Op("ReduceMean", x, name=name, exact=False)


def _check_reductions(m: Match, names: tuple[str, ...], x: gs.Tensor) -> str | None:
    rank = rank_of(x)
    for name in names:
        reason = last_axis_reduction(m.nodes[name], rank)
        if reason:
            return reason
    return None


def _check_affine(m: Match, x: gs.Tensor, names: tuple[str, ...]) -> str | None:
    width = x.shape[-1] if x.shape else None
    for name in names:
        if name not in m.tensors:
            continue
        value = m.const(name)
        if value.ndim != 1 or (isinstance(width, int) and value.shape[0] != width):
            return f"{name} has shape {list(value.shape)}, expected [{width}] over the last axis"
    return None


class LayerNormRule(RewriteRule):
    """(x - mean) / sqrt(var + eps) * gamma (+ beta) over the last axis -> LayerNormalization."""

    name = "LayerNorm.decomposed"
    fusion = "LayerNorm"
    emits = "LayerNormalization"
    root: ClassVar[tuple[str, ...]] = ("Add", "Mul")
    anchor: ClassVar[tuple[str, ...]] = ("ReduceMean",)
    min_opset = 17

    def pattern(self) -> Pattern:
        x = Var("x")
        centered = Op("Sub", x, _reduce_mean(x, "mean"), name="sub")
        var = _reduce_mean(
            AnyOf([Op("Pow", centered, Const("two", is_scalar(2.0))), Op("Mul", centered, centered)]), "var"
        )
        std = Op("Sqrt", Op("Add", var, Const("eps", is_scalar())))
        normed = AnyOf([Op("Div", centered, std), Op("Mul", centered, Op("Reciprocal", std))])
        scaled = Op("Mul", normed, Const("gamma"))
        return AnyOf([Op("Add", scaled, Const("beta")), scaled])

    def check(self, m: Match, model: Model) -> str | None:
        x = m.tensors["x"]
        return _check_reductions(m, ("mean", "var"), x) or _check_affine(m, x, ("gamma", "beta"))

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        x, gamma = m.tensors["x"], m.tensors["gamma"]
        inputs = [x, gamma] + ([m.tensors["beta"]] if "beta" in m.tensors else [])
        eps = scalar(m.const("eps"))
        return [
            gs.Node(
                self.emits,
                new_node_name(model, m.nodes["sub"], self.emits),
                attrs={"axis": -1, "epsilon": float(eps or 1e-5)},
                inputs=inputs,
                outputs=[out],
            )
        ]


class RMSNormRule(RewriteRule):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Llama style) -> RMSNormalization.

    fp16/bf16 graphs upcast x to fp32 first and cast back before the weight; the fused op does
    the same through stash_type=1 (statistics in fp32).
    """

    name = "RMSNorm.llama"
    fusion = "RMSNorm"
    emits = "RMSNormalization"
    root: ClassVar[tuple[str, ...]] = ("Mul",)
    anchor: ClassVar[tuple[str, ...]] = ("ReduceMean",)
    min_opset = 23

    def pattern(self) -> Pattern:
        x = Var("x")
        x32 = AnyOf([Op("Cast", x, name="upcast", attrs={"to": DType.FP32.onnx}), x])
        square = AnyOf([Op("Pow", x32, Const("two", is_scalar(2.0))), Op("Mul", x32, x32)])
        std = Op("Sqrt", Op("Add", _reduce_mean(square, "mean"), Const("eps", is_scalar())))
        normed = AnyOf(
            [
                Op("Mul", x32, Op("Div", Const("one", is_scalar(1.0)), std)),
                Op("Mul", x32, Op("Reciprocal", std)),
                Op("Div", x32, std),
            ]
        )
        back = AnyOf([Op("Cast", normed, name="downcast"), normed])
        return Op("Mul", Const("weight"), back)

    def check(self, m: Match, model: Model) -> str | None:
        x = m.tensors["x"]
        reason = _check_reductions(m, ("mean",), x) or _check_affine(m, x, ("weight",))
        if reason:
            return reason
        x_type, weight_type = onnx_elem_type(x.dtype), onnx_elem_type(m.tensors["weight"].dtype)
        if "downcast" in m.nodes and x_type is not None and m.nodes["downcast"].attrs.get("to") != x_type:
            return "the normalized value is cast to a type other than the input's"
        if x_type is not None and weight_type != x_type:
            return f"weight dtype {weight_type} differs from input dtype {x_type} (ONNX types)"
        return None

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        eps = scalar(m.const("eps"))
        anchor = m.nodes["mean"]
        return [
            gs.Node(
                self.emits,
                new_node_name(model, anchor, self.emits),
                attrs={"axis": -1, "epsilon": float(eps or 1e-6), "stash_type": 1},
                inputs=[m.tensors["x"], m.tensors["weight"]],
                outputs=[out],
            )
        ]
