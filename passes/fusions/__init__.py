"""Fusion rules, grouped by the fusion they count toward, and counting fused ops in a graph.

Targets are standard ONNX ops that both ONNX Runtime and TensorRT's ONNX parser take (README:
"Fused-op vocabulary"): LayerNormalization (17), Gelu (20), RMSNormalization, RotaryEmbedding and
Attention (23).
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from llm2trt.errors import InputError
from llm2trt.passes.fusions.attention import AttentionRule
from llm2trt.passes.fusions.gelu import GeluErfRule, GeluTanhRule
from llm2trt.passes.fusions.norms import LayerNormRule, RMSNormRule
from llm2trt.passes.fusions.rope import RoPERule
from llm2trt.passes.pattern import RewriteRule

# Order matters only for speed and readability of reports: norms and activations first, then
# RoPE, then attention (whose Q input is the RoPE output).
FUSIONS: dict[str, tuple[type[RewriteRule], ...]] = {
    "LayerNorm": (LayerNormRule,),
    "RMSNorm": (RMSNormRule,),
    "Gelu": (GeluErfRule, GeluTanhRule),
    "RoPE": (RoPERule,),
    "Attention": (AttentionRule,),
}

# What each fusion leaves in the graph: counted from the graph, whoever made the node.
FUSED_OPS: dict[str, tuple[str, ...]] = {
    "LayerNorm": ("LayerNormalization",),
    "RMSNorm": ("RMSNormalization",),
    "Gelu": ("Gelu",),
    "RoPE": ("RotaryEmbedding",),
    "Attention": ("Attention",),
}


def rules_for(skip: tuple[str, ...] | list[str] = ()) -> dict[str, list[RewriteRule]]:
    unknown = [s for s in skip if s not in FUSIONS]
    if unknown:
        raise InputError(f"unknown fusion {unknown[0]!r} for --skip-fusion; fusions: {', '.join(FUSIONS)}")
    return {name: [rule() for rule in rules] for name, rules in FUSIONS.items() if name not in skip}


def required_opset(fusions: list[str]) -> int:
    return max((rule.min_opset for name in fusions for rule in FUSIONS[name]), default=1)


def count_fusions(graph: gs.Graph) -> dict[str, int]:
    ops = Counter(n.op for n in graph.nodes if (n.domain or "") in ("", "ai.onnx"))
    return {name: sum(ops[op] for op in op_types) for name, op_types in FUSED_OPS.items()}


__all__ = ["FUSED_OPS", "FUSIONS", "count_fusions", "required_opset", "rules_for"]
