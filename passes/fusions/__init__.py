"""The fusion registry: each fusion is the rules that count toward it; what it leaves in the
graph (the ops its rules emit), the opset it needs and the counts all derive from the rules.

Targets are standard ONNX ops that both ONNX Runtime and TensorRT's ONNX parser take (README:
"Fused-op vocabulary"): LayerNormalization (17), Gelu (20), RMSNormalization, RotaryEmbedding and
Attention (23).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from llm2trt.core.errors import InputError
from llm2trt.core.registry import Registry
from llm2trt.passes.fusions.alibi import AlibiAttentionRule
from llm2trt.passes.fusions.attention import AttentionRule
from llm2trt.passes.fusions.gelu import GeluErfRule, GeluTanhRule
from llm2trt.passes.fusions.norms import LayerNormRule, RMSNormRule
from llm2trt.passes.fusions.rope import RoPERule
from llm2trt.passes.ort_op_table import DOMAIN, MOE
from llm2trt.passes.pattern import RewriteRule


@dataclass(frozen=True)
class Fusion:
    """One fusion: its rules, in the order they are tried. One with no rules is made at export
    (the experts traced as one MoE node): optimize only counts it."""

    name: str
    rules: tuple[type[RewriteRule], ...]

    def __post_init__(self) -> None:
        wrong = [r.__name__ for r in self.rules if r.fusion != self.name]
        if wrong:
            raise ValueError(f"rules {wrong} do not count toward fusion {self.name!r}")

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops this fusion leaves in the graph (counted whoever made them)."""
        return tuple(dict.fromkeys(rule.emits for rule in self.rules))

    @property
    def min_opset(self) -> int:
        return max((rule.min_opset for rule in self.rules), default=1)


FUSIONS: Registry[Fusion] = Registry("fusion")

# Ops outside the standard vocabulary that do a fusion's work (ONNX Runtime's contrib ops, made by
# passes/ort_gqa.py): (domain, op) -> how many of the fusion one such node counts for.
NodeCount = Callable[[gs.Node], int]
EQUIVALENTS: dict[str, dict[tuple[str, str], NodeCount]] = {}


def register_equivalent(fusion: str, domain: str, op: str, count: NodeCount = lambda node: 1) -> None:
    """Count nodes of `domain.op` toward `fusion` (e.g. GroupQueryAttention toward Attention)."""
    check_fusion_names([fusion], "an equivalent op")
    EQUIVALENTS.setdefault(fusion, {})[(domain, op)] = count


def register_fusion(*rules: type[RewriteRule]) -> Fusion:
    fusion = Fusion(rules[0].fusion, rules)
    return FUSIONS.register(fusion.name, fusion)


def register_export_fusion(name: str, domain: str, op: str) -> Fusion:
    """A fusion the export makes (`domain.op` nodes), counted and gated like the rules' fusions."""
    fusion = FUSIONS.register(name, Fusion(name, ()))
    register_equivalent(name, domain, op)
    return fusion


# Order matters only for speed and readability of reports: norms and activations first, then
# RoPE, then attention (whose Q input is the RoPE output).
register_fusion(LayerNormRule)
register_fusion(RMSNormRule)
register_fusion(GeluErfRule, GeluTanhRule)
register_fusion(RoPERule)
register_fusion(AttentionRule, AlibiAttentionRule)


def check_fusion_names(names: tuple[str, ...] | list[str], what: str) -> None:
    unknown = [s for s in names if s not in FUSIONS]
    if unknown:
        raise InputError(f"unknown fusion {unknown[0]!r} for {what}; fusions: {', '.join(FUSIONS)}")


# The experts of a mixture-of-experts layer (passes/moe.py).
register_export_fusion("MoE", DOMAIN, MOE.name)


def selected(skip: tuple[str, ...] | list[str] = ()) -> list[Fusion]:
    check_fusion_names(skip, "--skip-fusion")
    made = [s for s in skip if not FUSIONS.get(s).rules]
    if made:
        raise InputError(f"--skip-fusion {made[0]}: {made[0]} is made at export, not by optimize; nothing to skip")
    return [f for f in FUSIONS.entries() if f.name not in skip]


def rewrites(skip: tuple[str, ...] | list[str] = ()) -> list[Fusion]:
    """The selected fusions optimize rewrites the graph for (one made at export has nothing to run)."""
    return [f for f in selected(skip) if f.rules]


def required_opset(fusions: list[Fusion]) -> int:
    return max((f.min_opset for f in fusions), default=1)


def count_fusions(graph: gs.Graph) -> dict[str, int]:
    ops = Counter(n.op for n in graph.nodes if (n.domain or "") in ("", "ai.onnx"))
    counts = {f.name: sum(ops[op] for op in f.ops) for f in FUSIONS.entries()}
    for name, equivalents in EQUIVALENTS.items():
        for node in graph.nodes:
            count = equivalents.get((node.domain or "", node.op))
            counts[name] += count(node) if count else 0
    return counts


__all__ = [
    "EQUIVALENTS",
    "FUSIONS",
    "Fusion",
    "check_fusion_names",
    "count_fusions",
    "register_equivalent",
    "register_fusion",
    "required_opset",
    "rewrites",
    "selected",
]
