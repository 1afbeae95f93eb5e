"""RoPE fusion: x * cos + rotate_half(x) * sin (Llama's non-interleaved form) -> RotaryEmbedding (opset 23).

The fused op takes X as (batch, heads, seq, head_dim) and cos/sin as (batch, seq, head_dim/2).
transformers builds cos/sin of width head_dim by concatenating the frequencies with themselves,
so the first half is the cache; the check proves that duplication from the graph before it
slices. The interleaved form (GPT-J style) would be a second rule with interleaved=1.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.passes.fusions.common import int64, new_node_name, rank_of, static_dim
from llm2trt.passes.manager import Model
from llm2trt.passes.pattern import Const, Match, Op, Pattern, RewriteRule, Var


def _slice_bounds(node: gs.Node) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of a one-axis Slice with constant bounds."""
    values: list[int | None] = []
    for i in range(1, 5):
        t = node.inputs[i] if i < len(node.inputs) else None
        if t is None or t.is_empty():
            values.append(None)
        elif isinstance(t, gs.Constant) and np.asarray(t.values).size == 1:
            values.append(int(np.asarray(t.values).reshape(-1)[0]))
        else:
            return None
    start, end, axis, step = values
    if start is None or end is None:
        return None
    return start, end, -1 if axis is None else axis, 1 if step is None else step


def _duplicated_halves(t: gs.Tensor, depth: int = 8) -> gs.Tensor | None:
    """If `t` (cos or sin, width D) is f(concat(a, a)) for elementwise f, the tensor concat(a, a)."""
    for _ in range(depth):
        if not t.inputs:
            return None
        node = t.inputs[0]
        if node.op == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
            return t
        if node.op in ("Cos", "Sin", "Cast", "Unsqueeze", "Identity"):
            t = node.inputs[0]
        elif node.op == "Mul" and any(
            isinstance(i, gs.Constant) and np.asarray(i.values).size == 1 for i in node.inputs
        ):
            t = next(i for i in node.inputs if not isinstance(i, gs.Constant))
        else:
            return None
    return None


def _check_table(m: Match, name: str) -> str | None:
    """Why the cos or sin input is not a (batch, 1, seq, head_dim) table of duplicated halves."""
    table = m.tensors[name]
    if rank_of(table) != 4 or static_dim(table, 1) != 1:
        return f"{name} {table.name!r} is not (batch, 1, seq, head_dim)"
    if _duplicated_halves(table) is None:
        return f"cannot prove {name}'s two halves are equal (not cat(freqs, freqs))"
    if not table.inputs or table.inputs[0].op != "Unsqueeze":
        return f"{name} is not an Unsqueeze of a (batch, seq, head_dim) table"
    return None


class RoPERule(RewriteRule):
    name = "RoPE.rotate_half"
    fusion = "RoPE"
    emits = "RotaryEmbedding"
    root: ClassVar[tuple[str, ...]] = ("Add",)
    anchor: ClassVar[tuple[str, ...]] = ("Neg",)
    min_opset = 23

    def pattern(self) -> Pattern:
        x = Var("x")
        first = Op("Slice", x, Const("s0"), Const("e0"), exact=False, name="first")
        second = Op("Slice", x, Const("s1"), Const("e1"), exact=False, name="second")
        rotated = Op("Concat", Op("Neg", second, name="neg"), first, name="concat")
        return Op("Add", Op("Mul", x, Var("cos")), Op("Mul", rotated, Var("sin")))

    def check(self, m: Match, model: Model) -> str | None:
        x = m.tensors["x"]
        if rank_of(x) != 4:
            return f"{x.name!r} has rank {rank_of(x)}, expected (batch, heads, seq, head_dim)"
        dim = static_dim(x, -1)
        if dim is None or dim % 2:
            return f"head_dim of {x.name!r} is not a static even number"
        half = dim // 2
        first, second = _slice_bounds(m.nodes["first"]), _slice_bounds(m.nodes["second"])
        if first is None or second is None:
            return "rotate_half slices have non-constant bounds"
        if first[2] not in (-1, 3) or second[2] not in (-1, 3) or first[3] != 1 or second[3] != 1:
            return "rotate_half slices are not unit-step slices of the last axis"
        if first[0] != 0 or first[1] != half or second[0] != half or second[1] < dim:
            return f"slices {first[:2]} and {second[:2]} are not the halves of head_dim {dim} (partial rotary?)"
        if int(m.nodes["concat"].attrs.get("axis", 0)) not in (-1, 3):
            return "rotate_half concatenates on another axis than the last"
        return _check_table(m, "cos") or _check_table(m, "sin")

    def _half_table(self, model: Model, table: gs.Tensor, half: int) -> gs.Tensor:
        """(batch, seq, head_dim/2) from the (batch, 1, seq, head_dim) table; one Slice per table."""
        source = table.inputs[0].inputs[0]  # the 3-D tensor before Unsqueeze(axis=1)
        name = f"{source.name}/rope_half"
        for consumer in source.outputs:  # Q's and K's RoPE share one Slice per table
            if consumer.op == "Slice" and consumer.outputs and consumer.outputs[0].name == name:
                return consumer.outputs[0]
        out = gs.Variable(model.fresh_name(name), dtype=source.dtype, shape=None)
        node = gs.Node(
            "Slice",
            # Named in the table producer's scope (rotary_emb), so the node maps to its module.
            new_node_name(model, source.inputs[0], "Slice_rope_half") if source.inputs else model.fresh_name(name),
            inputs=[
                source,
                int64([0], model, f"{name}/starts"),
                int64([half], model, f"{name}/ends"),
                int64([-1], model, f"{name}/axes"),
            ],
            outputs=[out],
        )
        model.graph.nodes.append(node)
        model.tag(node, self.name)
        return out

    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        x = m.tensors["x"]
        half = (static_dim(x, -1) or 0) // 2
        cos = self._half_table(model, m.tensors["cos"], half)
        sin = self._half_table(model, m.tensors["sin"], half)
        return [
            gs.Node(
                self.emits,
                new_node_name(model, m.nodes["neg"], self.emits),
                attrs={"interleaved": 0},
                inputs=[x, cos, sin],
                outputs=[out],
            )
        ]
