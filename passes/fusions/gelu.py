"""GELU fusions: the erf form (BERT, ViT) and the tanh approximation (GPT-2, BLOOM) -> Gelu (opset 20)."""

from __future__ import annotations

import math
from typing import ClassVar

import onnx_graphsurgeon as gs

from llm2trt.passes.fusions.common import new_node_name
from llm2trt.passes.manager import Model
from llm2trt.passes.pattern import AnyOf, Const, Match, Op, Pattern, RewriteRule, Var, is_scalar

HALF = is_scalar(0.5)
ONE = is_scalar(1.0)


def _half_x_times(x: Var, one_plus: Pattern) -> Pattern:
    """0.5 * x * (1 + f(x)), in the three association orders exporters produce."""
    return AnyOf(
        [
            Op("Mul", Op("Mul", x, one_plus), Const("half", HALF)),
            Op("Mul", Op("Mul", x, Const("half", HALF)), one_plus),
            Op("Mul", x, Op("Mul", one_plus, Const("half", HALF))),
        ]
    )


class _GeluRule(RewriteRule):
    fusion = "Gelu"
    emits = "Gelu"
    root: ClassVar[tuple[str, ...]] = ("Mul",)
    min_opset = 20
    approximate: ClassVar[str]

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        near = m.matched[-1]
        return [
            gs.Node(
                self.emits,
                new_node_name(model, near, self.emits),
                attrs={"approximate": self.approximate},
                inputs=[m.tensors["x"]],
                outputs=[out],
            )
        ]


class GeluErfRule(_GeluRule):
    """x * 0.5 * (1 + erf(x / sqrt(2)))."""

    name = "Gelu.erf"
    anchor: ClassVar[tuple[str, ...]] = ("Erf",)
    approximate = "none"

    def pattern(self) -> Pattern:
        x = Var("x")
        scaled = AnyOf(
            [
                Op("Div", x, Const("sqrt2", is_scalar(math.sqrt(2.0)))),
                Op("Mul", x, Const("inv_sqrt2", is_scalar(1.0 / math.sqrt(2.0)))),
            ]
        )
        one_plus = Op("Add", Op("Erf", scaled), Const("one", ONE))
        return _half_x_times(x, one_plus)


class GeluTanhRule(_GeluRule):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).

    The tanh argument comes in two factorings: GPT-2's `k * (x + c * x^3)` and BLOOM's
    `(k * x) * (1 + c * x * x)` (its bloom_gelu_forward); both are the same function.
    """

    name = "Gelu.tanh"
    anchor: ClassVar[tuple[str, ...]] = ("Tanh",)
    approximate = "tanh"

    def pattern(self) -> Pattern:
        x = Var("x")
        c, k = Const("c", is_scalar(0.044715)), Const("k", is_scalar(math.sqrt(2.0 / math.pi)))
        cube = AnyOf([Op("Pow", x, Const("three", is_scalar(3.0))), Op("Mul", x, Op("Mul", x, x))])
        c_square = AnyOf([Op("Mul", Op("Mul", x, c), x), Op("Mul", Op("Mul", x, x), c)])
        argument = AnyOf(
            [
                Op("Mul", Op("Add", x, Op("Mul", cube, c)), k),
                Op("Mul", Op("Mul", x, k), Op("Add", c_square, Const("inner_one", ONE))),
            ]
        )
        return _half_x_times(x, Op("Add", Op("Tanh", argument), Const("one", ONE)))
