"""A small pattern language over onnx-graphsurgeon graphs, and the rewrite-rule driver.

A pattern is a tree of `Op`, `Var`, `Const` and `AnyOf`, matched from a root tensor upwards
through producers. Binary ops that commute (Add, Mul) are tried in both input orders;
alternatives are explicit (`AnyOf`, `Op` with several op types). A `Var` that appears twice must
bind the same tensor both times, which is how a pattern says "the same x feeds both branches".

A rule is three parts: `pattern()`, `check()` (returns the reason it refuses a structural match,
or None) and `rewrite()` (returns the nodes that replace the match). The driver counts rewrites
per rule, tags new nodes with the rule's name, refuses matches whose intermediate tensors are used
outside the match, and records why candidates near an anchor op were not fused.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.errors import InputError
from llm2trt.core.reports import Refusal
from llm2trt.passes.manager import GraphPass, Model, PassResult

logger = logging.getLogger(__name__)

COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Max", "Min"})
AttrCheck = Callable[[Any], bool] | Any


# -- patterns ---------------------------------------------------------------------------------


class Pattern(abc.ABC):
    @abc.abstractmethod
    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        """Yield every extension of `m` under which this pattern produces `tensor`."""


@dataclass(eq=False)
class Var(Pattern):
    """Any tensor; the same name must bind the same tensor wherever it appears."""

    name: str
    where: Callable[[gs.Tensor], bool] | None = None

    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        bound = m.tensors.get(self.name)
        if bound is not None:
            if bound is tensor:
                yield m
            else:
                m.fail(f"{self.name} must be {bound.name!r} here, found {tensor.name!r}")
            return
        if self.where is not None and not self.where(tensor):
            m.fail(f"{tensor.name!r} does not qualify as {self.name}")
            return
        yield m.bind_tensor(self.name, tensor)


@dataclass(eq=False)
class Const(Pattern):
    """A constant tensor (initializer or folded), optionally with a condition on its value."""

    name: str
    where: Callable[[np.ndarray], bool] | None = None

    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        if not isinstance(tensor, gs.Constant):
            m.fail(f"{self.name}: expected a constant, found {tensor.name!r}")
            return
        if self.where is not None and not self.where(np.asarray(tensor.values)):
            m.fail(f"{self.name}: constant {tensor.name!r} has an unexpected value")
            return
        bound = m.tensors.get(self.name)
        if bound is not None and bound is not tensor:
            m.fail(f"{self.name} must be {bound.name!r}")
            return
        yield m.bind_tensor(self.name, tensor)


@dataclass(eq=False)
class AnyOf(Pattern):
    """The first alternatives first: put the most specific one first."""

    options: Sequence[Pattern]

    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        for option in self.options:
            yield from option.match(tensor, m)


class Op(Pattern):
    """A node of one of `ops` producing the tensor at output `index`, with matching inputs.

    `attrs` maps attribute names to an expected value or a predicate. `name` binds the node.
    `inputs` may be shorter than the node's inputs only when `exact=False`.
    """

    def __init__(
        self,
        ops: str | tuple[str, ...],
        *inputs: Pattern,
        name: str | None = None,
        attrs: dict[str, AttrCheck] | None = None,
        index: int = 0,
        exact: bool = True,
        domain: str = "",
    ) -> None:
        self.ops = (ops,) if isinstance(ops, str) else ops
        self.inputs = inputs
        self.name = name
        self.attrs = attrs or {}
        self.index = index
        self.exact = exact
        self.domain = domain

    def match(self, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
        if not tensor.inputs:
            m.fail(f"expected {'|'.join(self.ops)} producing {tensor.name!r}, found a graph input or constant")
            return
        node: gs.Node = tensor.inputs[0]
        if node.op not in self.ops or (node.domain or "") != self.domain:
            m.fail_op(self.ops, tensor, node)
            return
        if node.outputs.index(tensor) != self.index:
            m.fail(f"{node.name}: wrong output")
            return
        for key, want in self.attrs.items():
            have = node.attrs.get(key)
            ok = want(have) if callable(want) else _same(have, want)
            if not ok:
                m.fail(f"{node.name}: attribute {key}={have!r} does not fit")
                return
        if self.name is not None and self.name in m.nodes and m.nodes[self.name] is not node:
            m.fail(f"{node.name}: {self.name} already bound")
            return
        actual = [t for t in node.inputs]
        if (self.exact and len(actual) != len(self.inputs)) or len(actual) < len(self.inputs):
            m.fail(f"{node.name}: has {len(actual)} inputs, expected {len(self.inputs)}")
            return
        base = m.bind_node(self.name, node)
        orders = [self.inputs]
        if node.op in COMMUTATIVE and len(self.inputs) == 2:
            orders.append(self.inputs[::-1])
        for order in orders:
            yield from _match_all(order, actual, base)


def _match_all(patterns: Sequence[Pattern], tensors: Sequence[gs.Tensor], m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for partial in patterns[0].match(tensors[0], m):
        yield from _match_all(patterns[1:], tensors[1:], partial)


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)):
        return have is not None and list(have) == list(want)
    return bool(have == want)


@dataclass
class Failure:
    """The deepest point a match attempt reached before it failed: what it expected there.

    Alternatives that fail on the same tensor at the same depth merge into one message
    ("expected Cast|Softmax producing t, found Relu").
    """

    depth: int = -1
    text: str = "no candidate"
    expected: tuple[str, ...] = ()
    where: str = ""
    found: str = ""

    def offer(self, depth: int, reason: str) -> None:
        if depth > self.depth:
            self.depth, self.text, self.expected = depth, reason, ()

    def offer_op(self, depth: int, ops: tuple[str, ...], tensor: str, found: str) -> None:
        if depth == self.depth and self.expected and self.where == tensor:
            self.expected = tuple(dict.fromkeys((*self.expected, *ops)))
        elif depth > self.depth:
            self.depth, self.expected, self.where, self.found = depth, ops, tensor, found

    @property
    def reason(self) -> str:
        if self.expected:
            return f"expected {'|'.join(self.expected)} producing {self.where!r}, found {self.found}"
        return self.text


@dataclass
class Match:
    """Bindings of one match: tensors and nodes by name, plus every node matched."""

    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    matched: tuple[gs.Node, ...] = ()
    failure: Failure = field(default_factory=Failure)

    def bind_tensor(self, name: str, tensor: gs.Tensor) -> Match:
        return Match({**self.tensors, name: tensor}, self.nodes, self.matched, self.failure)

    def bind_node(self, name: str | None, node: gs.Node) -> Match:
        nodes = {**self.nodes, name: node} if name else self.nodes
        matched = self.matched if any(n is node for n in self.matched) else (*self.matched, node)
        return Match(self.tensors, nodes, matched, self.failure)

    def fail(self, reason: str) -> None:
        self.failure.offer(len(self.matched), reason)

    def fail_op(self, ops: tuple[str, ...], tensor: gs.Tensor, node: gs.Node) -> None:
        self.failure.offer_op(len(self.matched), ops, tensor.name, f"{node.op} ({node.name})")

    def const(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if not isinstance(tensor, gs.Constant):
            raise KeyError(f"{name} is not a constant")
        return np.asarray(tensor.values)


def scalar(value: np.ndarray) -> float | None:
    """The value of a one-element constant, else None."""
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def is_scalar(value: float | None = None, rel: float = 1e-2) -> Callable[[np.ndarray], bool]:
    """A predicate: a one-element constant, equal to `value` (relatively) when given."""

    def check(array: np.ndarray) -> bool:
        got = scalar(array)
        if got is None:
            return False
        return value is None or abs(got - value) <= rel * max(abs(value), 1e-12)

    return check


# -- rules and the driver ----------------------------------------------------------------------


class RewriteRule(abc.ABC):
    """Pattern, check, replacement. Subclasses set `name`, `fusion`, `emits`, `root` and `anchor`."""

    name: ClassVar[str]
    fusion: ClassVar[str]  # the fusion it counts toward: Attention, LayerNorm, RMSNorm, Gelu, RoPE
    emits: ClassVar[str]  # the standard ONNX op the rewrite leaves in the graph
    root: ClassVar[tuple[str, ...]]  # op types a match can end in
    # An op that marks a candidate: a root whose inputs reach an anchor within a few hops and
    # still does not match is reported with the reason the match stopped.
    anchor: ClassVar[tuple[str, ...]] = ()
    anchor_depth: ClassVar[int] = 4
    min_opset: ClassVar[int] = 1

    @abc.abstractmethod
    def pattern(self) -> Pattern: ...

    def check(self, m: Match, model: Model) -> str | None:
        """None to accept a structural match, else the reason to refuse it."""
        return None

    @abc.abstractmethod
    def rewrite(self, m: Match, model: Model, out: gs.Variable) -> list[gs.Node]:
        """Nodes computing `out` (the match's root output) from the match's inputs."""


def module_of(node_name: str) -> str:
    """The torch module a TorchScript-exported node came from: /model/model/layers.0/mlp/Mul ->
    model.layers.0.mlp; '' for a node outside every module (/Concat, Constant_12)."""
    if not node_name.startswith("/"):
        return ""
    parts = [p for p in node_name.strip("/").split("/") if p][:-1]  # the last part is the op
    if parts and parts[0] == "model":  # the export wrapper's own attribute
        parts = parts[1:]
    return ".".join(parts)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")


def layer_of(module: str) -> int | None:
    found = _LAYER.search(module)
    return int(found.group(1)) if found else None


def is_layer(module: str) -> bool:
    """The module is a whole layer of the model's stack (model.layers.3, not model.layers.3.mlp)."""
    found = _LAYER.search(module)
    return found is not None and found.end() == len(module)


def attention_per_layer(model: Model, num_layers: int, what: str) -> list[gs.Node]:
    """The fused standard `Attention` of every layer, in layer order; `what` (the pass, as the user
    asked for it) names who needs them when they are not one per layer."""
    nodes = [n for n in model.graph.nodes if n.op == "Attention" and (n.domain or "") in ("", "ai.onnx")]
    by_layer = {layer_of(module_of(n.name)): n for n in nodes}
    if len(nodes) != num_layers or set(by_layer) != set(range(num_layers)):
        raise InputError(
            f"{what} needs one fused Attention per layer: found {len(nodes)} for {num_layers} layers "
            "(is the Attention fusion skipped or missing?)"
        )
    return [by_layer[i] for i in range(num_layers)]


def _reaches(node: gs.Node, ops: tuple[str, ...], depth: int) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for t in n.inputs:
                for producer in t.inputs:
                    if producer.op in ops:
                        return True
                    nxt.append(producer)
        frontier = nxt
    return False


def _escapes(m: Match, root: gs.Node, graph_outputs: set[str]) -> str | None:
    """Name an intermediate tensor that something outside the match also reads."""
    inside = {id(n) for n in m.matched}
    for node in m.matched:
        if node is root:
            continue
        for out in node.outputs:
            if out.name in graph_outputs:
                return f"{out.name!r} is a graph output"
            for consumer in out.outputs:
                if id(consumer) not in inside:
                    return f"{out.name!r} is also read by {consumer.name} ({consumer.op})"
    return None


class RewritePass(GraphPass):
    """Apply a set of rules everywhere they match; count per rule; record refusals."""

    def __init__(self, name: str, rules: Sequence[RewriteRule]) -> None:
        self.name = name  # type: ignore[misc]
        self.rules = list(rules)

    def run(self, model: Model) -> PassResult:
        counts: dict[str, int] = {}
        refusals: list[Refusal] = []
        for rule in self.rules:
            counts[rule.name] = _apply_rule(rule, model, refusals)
        model.graph.toposort()
        return PassResult(
            modified=any(counts.values()),
            counts=counts,
            notes=[f"{r.rule} not applied at {r.module or r.node}: {r.reason}" for r in refusals],
            refusals=refusals,
        )


def _apply_rule(rule: RewriteRule, model: Model, refusals: list[Refusal]) -> int:
    """Rewrite every match of one rule; append a refusal for each candidate left alone."""
    graph = model.graph
    outputs = {t.name for t in graph.outputs}
    pattern = rule.pattern()
    graph.toposort()
    alive = {id(n) for n in graph.nodes}
    count = 0
    # Outputs first: a match ending in a later node is the larger one (LayerNorm's bias Add
    # before its scale Mul), so the whole pattern fuses, not a prefix of it.
    for node in reversed(list(graph.nodes)):
        if id(node) not in alive or node.op not in rule.root or not node.outputs:
            continue
        if not node.outputs[0].outputs and node.outputs[0].name not in outputs:
            continue
        failure = Failure()
        refused: str | None = None
        for m in pattern.match(node.outputs[0], Match(failure=failure)):
            refused = _escapes(m, node, outputs) or rule.check(m, model)
            if refused is None:
                _replace(rule, m, model, node, alive)
                count += 1
                break
        else:
            if refused or (rule.anchor and _reaches(node, rule.anchor, rule.anchor_depth)):
                refusals.append(Refusal(rule.name, node.name, module_of(node.name), refused or failure.reason))
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
    return count


def _replace(rule: RewriteRule, m: Match, model: Model, root: gs.Node, alive: set[int]) -> None:
    out = root.outputs[0]
    root.outputs.clear()
    for new in rule.rewrite(m, model, out):
        model.graph.nodes.append(new)
        model.tag(new, rule.name)
    # Nothing outside the match reads its intermediates (_escapes): disconnect the matched nodes
    # now so later matches never see them, and clean up once per rule (a whole-graph cleanup
    # per fusion made big graphs quadratic).
    for dead in m.matched:
        dead.inputs.clear()
        dead.outputs.clear()
        alive.discard(id(dead))
