"""Which ONNX tensors are which PyTorch modules' outputs, and which marks would split a fusion.

The exporter keeps each node's module scope in its name (`/model/model/layers.0/mlp/down_proj/
MatMul`) and the passes name the nodes they make after the nodes they replace, so the scope
survives optimization; a node's `llm2trt.module` metadata, when present, overrides the name.
A module's output is the last tensor its scope produces that something outside the scope reads
(or that is a graph output). A tensor that several nested modules output (down_proj and mlp) is
named by the innermost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from llm2trt.backends.base import Mark
from llm2trt.core.errors import InputError
from llm2trt.core.records import Record
from llm2trt.passes.manager import RULE_KEY
from llm2trt.passes.pattern import RewritePass, is_layer, layer_of, module_of

MODULE_KEY = "llm2trt.module"


def node_module(node: onnx.NodeProto) -> str:
    """The module scope of a node: its metadata, else its TorchScript name; '' when unscoped."""
    for prop in node.metadata_props:
        if prop.key == MODULE_KEY:
            return str(prop.value)
    return module_of(node.name)


def _within(module: str, scope: str) -> bool:
    return module == scope or module.startswith(scope + ".")


def _chain(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class GraphMap:
    """Every tensor a node produces, in graph order, with its module-output role."""

    marks: list[Mark]  # module outputs that are not graph outputs, graph order
    outputs: list[Mark]  # the graph's outputs, named by module where they are one
    produced: dict[str, int]  # every node output -> producer index
    scopes: dict[str, str]  # every node output -> its producer's scope
    interior: dict[str, str] = field(default_factory=dict)  # tensor inside a fusion -> its rule

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphMap:
        graph = model.graph
        nodes = list(graph.node)
        graph_outputs = [o.name for o in graph.output]
        produced: dict[str, int] = {}
        scopes: dict[str, str] = {}
        readers: dict[str, list[str]] = {}
        for i, node in enumerate(nodes):
            scope = node_module(node)
            for name in node.input:
                readers.setdefault(name, []).append(scope)
            for name in node.output:
                if name:
                    produced[name], scopes[name] = i, scope
        last = _last_exits(produced, scopes, readers, set(graph_outputs))
        owner: dict[str, str] = {}
        for scope, (_, tensor) in sorted(last.items(), key=lambda kv: len(kv[0])):
            owner[tensor] = scope  # deeper scopes come later and win
        layers = {tensor for scope, (_, tensor) in last.items() if is_layer(scope)}
        outputs_set = set(graph_outputs)

        def mark(t: str, index: int, output: bool) -> Mark:
            module = owner.get(t)
            return Mark(t, module, layer_of(module or ""), index, output, t in layers)

        marks = sorted((mark(t, produced[t], False) for t in owner if t not in outputs_set), key=lambda m: m.index)
        outputs = [mark(o, produced.get(o, -1), True) for o in graph_outputs]
        return cls(marks, outputs, produced, scopes, _fused_interior(nodes))

    def select(self, mode: str) -> list[Mark]:
        """`none`, `all` (every module output) or a regular expression searched in a tensor's name
        and its module (any tensor a node produces may be named this way)."""
        if mode == "none":
            return []
        if mode == "all":
            return list(self.marks)
        try:
            pattern = re.compile(mode)
        except re.error as exc:
            raise InputError(f"--mark takes none, all or a regular expression; {mode!r} is not one: {exc}") from None
        by_tensor = {m.tensor: m for m in self.marks}
        outputs = {o.tensor for o in self.outputs}
        chosen = []
        for tensor, index in self.produced.items():
            if tensor in outputs:
                continue
            mark = by_tensor.get(tensor) or Mark(tensor, None, layer_of(self.scopes[tensor]), index)
            if pattern.search(tensor) or (mark.module and pattern.search(mark.module)):
                chosen.append(mark)
        if not chosen:
            raise InputError(f"--mark {mode!r} matches no tensor or module of the graph")
        return sorted(chosen, key=lambda m: m.index)

    def layer_outputs(self) -> list[Mark]:
        """Each layer's output in graph order (the last layer's may be a graph output)."""
        return sorted((m for m in [*self.marks, *self.outputs] if m.layer_output), key=lambda m: m.index)

    def between(self, after: int, upto: int) -> list[Mark]:
        """Module outputs produced after node `after` up to node `upto` (inclusive)."""
        return [m for m in self.marks if after < m.index <= upto]


def _last_exits(
    produced: dict[str, int], scopes: dict[str, str], readers: dict[str, list[str]], graph_outputs: set[str]
) -> dict[str, tuple[int, str]]:
    """Per scope, the last-produced tensor that leaves it."""
    last: dict[str, tuple[int, str]] = {}
    for tensor, index in produced.items():
        chain = _chain(scopes[tensor])
        if tensor in graph_outputs:
            left = chain
        else:
            reading = readers.get(tensor, [])
            left = [s for s in chain if any(not _within(r, s) for r in reading)]
        for scope in left:
            if scope not in last or last[scope][0] < index:
                last[scope] = (index, tensor)
    return last


def _fused_interior(nodes: list[onnx.NodeProto]) -> dict[str, str]:
    """Tensors between nodes one rewrite made (same rule, same scope): marking one splits it."""
    rule_of: dict[int, tuple[str, str]] = {}
    for i, node in enumerate(nodes):
        for prop in node.metadata_props:
            if prop.key == RULE_KEY:
                rule_of[i] = (prop.value, node_module(node))
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    interior = {}
    for i, tag in rule_of.items():
        for name in nodes[i].output:
            reading = readers.get(name, [])
            if reading and all(rule_of.get(r) == tag for r in reading):
                interior[name] = tag[0]
    return interior


@dataclass(frozen=True)
class Split(Record):
    """A requested mark inside a fusion: TensorRT (or our passes) could no longer fuse there."""

    tensor: str
    fusion: str

    def render(self) -> str:
        return f"marking {self.tensor} splits the {self.fusion} fusion there"


def fusion_splits(onnx_path: Path, graph_map: GraphMap, marks: Iterable[Mark]) -> list[Split]:
    """The marks that would split a fusion: inside one our passes made (tagged nodes), or, in a
    graph not optimized yet, on a tensor a fusion pass removes (found by running the passes on a
    copy of the graph)."""
    wanted = {m.tensor for m in marks}
    found = {t: rule for t, rule in graph_map.interior.items() if t in wanted}
    if not graph_map.interior:
        found.update({t: f for t, f in fused_away(onnx_path).items() if t in wanted})
    return [Split(t, f) for t, f in sorted(found.items(), key=lambda kv: graph_map.produced.get(kv[0], -1))]


def fused_away(onnx_path: Path) -> dict[str, str]:
    """Tensors of the graph that the fusion passes remove, by the fusion that removed them."""
    from llm2trt.passes.manager import Model, PassManager
    from llm2trt.passes.pipeline import PipelineOptions, assemble

    model = Model.from_onnx(onnx.load(str(onnx_path), load_external_data=True))
    removed: dict[str, str] = {}
    for graph_pass in assemble(PipelineOptions()).passes:  # what `optimize` runs, one pass at a time
        before = set(model.graph.tensors())
        PassManager([graph_pass]).run(model)
        if isinstance(graph_pass, RewritePass):
            fusion = graph_pass.rules[0].fusion
            removed.update({t: fusion for t in before - set(model.graph.tensors())})
    return removed
