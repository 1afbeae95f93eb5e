"""Pipeline parallelism: cut an optimized decoder graph down to one stage's graph.

The cut reads the graph's data flow, not its node names alone:

- **the stream**: every tensor computed from the embedding lookup's output (a Gather whose indices
  come from `input_ids`), through any op but Shape and Size (which read a tensor's shape, not its
  values). Each node of the stream belongs to a stage: a node named in a layer to the stage holding
  that layer, any other to the latest stage among the stream tensors it reads (the embedding's
  nodes to stage 0, the final norm and lm_head to the last).
- **the activations**: stream tensors made in one stage and read by the stream in the next (the
  hidden state; where the gqa form's skip norms read the residual and the branch apart, both).
  A stage takes them as graph inputs (`hidden_states`, then `hidden_states.1`) and the stage before
  gives them as outputs (`hidden_states_out`, ...), `[batch, sequence, hidden]` in their own type.
- **everything else** (the attention mask, positions, rotary tables, the past length, masks one
  layer computed and another reuses): replicated into every stage that needs it, by keeping what
  the stage's outputs need. A Shape of a stream tensor of an earlier stage reads the stage's
  incoming hidden state instead (the same `[batch, sequence, hidden]`), and a node outside the
  stream that reads a past-KV input of a layer the stage does not hold reads the stage's own first
  layer's (the same shape: what it reads is the past length).

The stage's outputs are its layers' presents and the outgoing activations, or on the last stage
the logits; whatever they do not need is dropped. Its cache tensors are numbered from 0
(`llm2trt.core.pp`). What the cut cannot do (a stream tensor read two stages later, a node of
another stage the stage would need) is refused by name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from llm2trt.core.errors import InputError
from llm2trt.core.kv import BATCH, KV_KINDS, SEQUENCE, KVKind, KVLayout, past_name, present_name
from llm2trt.core.pp import StagePlan, activation_name
from llm2trt.passes.manager import GraphPass, Model, PassResult
from llm2trt.passes.pattern import layer_of, module_of

IDS = "input_ids"
# Ops that read only the shape of their input: they are not part of the stream they read.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


@dataclass
class _Flow:
    """The stream of a graph and the stage of each of its nodes."""

    plan: StagePlan
    stream: set[str] = field(default_factory=set)  # tensor names
    stage: dict[int, int] = field(default_factory=dict)  # id() of a stream node -> its stage
    producer: dict[str, gs.Node] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: gs.Graph, plan: StagePlan) -> _Flow:
        flow = cls(plan)
        ids = _from_ids(graph)
        for node in graph.nodes:
            for out in node.outputs:
                flow.producer[out.name] = node
            if node.op in _SHAPE_ONLY:
                continue
            reads = [t.name for t in node.inputs if t.name in flow.stream]
            if reads or _is_embedding(node, ids):
                flow._join(node, reads)
        if not flow.stream:
            raise InputError(f"--pp: no embedding lookup (a Gather of {IDS}) found; is this a decoder graph?")
        return flow

    def _join(self, node: gs.Node, reads: list[str]) -> None:
        before = max((self.stage[id(self.producer[name])] for name in reads), default=0)
        layer = layer_of(module_of(node.name))
        if layer is None:
            stage = before
        elif not 0 <= layer < self.plan.num_layers:
            raise InputError(f"--pp: {node.name} is named in layer {layer}, past the model's {self.plan.num_layers}")
        else:
            stage = self.plan.stage_of(layer)
            if before > stage:
                raise InputError(
                    f"--pp: {node.name} (layer {layer}, stage {stage}) reads the stream of a later stage ({before})"
                )
        self.stage[id(node)] = stage
        self.stream.update(out.name for out in node.outputs)

    def of_node(self, node: gs.Node) -> int | None:
        """The stage of a stream node (None: not of the stream)."""
        return self.stage.get(id(node))

    def made_in(self, tensor: gs.Tensor) -> int | None:
        """The stage that makes a stream tensor (None: not of the stream)."""
        if tensor.name not in self.stream:
            return None
        return self.stage[id(self.producer[tensor.name])]

    def crossing(self, graph: gs.Graph, boundary: int) -> list[gs.Tensor]:
        """The stream tensors made before `boundary` (a stage index) and read by the stream from it on,
        in the order they are first read; one made or read further away is refused."""
        found: dict[str, gs.Tensor] = {}
        for node in graph.nodes:
            stage = self.of_node(node)
            if stage is None or stage < boundary:
                continue
            for tensor in node.inputs:
                made = self.made_in(tensor)
                if made is None or made >= boundary:
                    continue
                if made != boundary - 1 or stage != boundary:
                    raise InputError(
                        f"--pp: {node.name} (stage {stage}) reads {tensor.name!r} of stage {made}: only activations "
                        "of the stage just before can be passed"
                    )
                found.setdefault(tensor.name, tensor)
        return list(found.values())


def _from_ids(graph: gs.Graph) -> set[str]:
    """Tensors whose values are computed from the token ids (Shape and Size read only sizes)."""
    ids = {t.name for t in graph.inputs if t.name == IDS}
    if not ids:
        raise InputError(f"--pp: the graph has no {IDS} input; only decoders are split into stages")
    for node in graph.nodes:
        if node.op not in _SHAPE_ONLY and any(t.name in ids for t in node.inputs):
            ids.update(out.name for out in node.outputs)
    return ids


def _is_embedding(node: gs.Node, ids: set[str]) -> bool:
    """A lookup of a table (not computed from the ids) by indices computed from the ids."""
    return node.op == "Gather" and node.inputs[1].name in ids and node.inputs[0].name not in ids


def _hidden_size(tensor: gs.Tensor, stage: int) -> int:
    """The hidden size of an activation passed into `stage`, which must be typed [batch, sequence, hidden]."""
    shape = tensor.shape
    if tensor.dtype is None or shape is None or len(shape) != 3 or not isinstance(shape[-1], int):
        raise InputError(
            f"--pp: the activation {tensor.name!r} entering stage {stage} is not typed [batch, sequence, hidden] "
            f"(it is {tensor.dtype} {shape})"
        )
    return int(shape[-1])


def _hidden_like(tensor: gs.Tensor, hidden: int) -> bool:
    """A tensor shaped as the hidden state ([batch, sequence, hidden]) as far as its type says."""
    shape = tensor.shape
    return shape is not None and len(shape) == 3 and shape[-1] == hidden


@dataclass
class _Cut:
    """One stage's cut of one graph."""

    model: Model
    plan: StagePlan
    kv: KVLayout | None
    flow: _Flow
    counts: Counter[str] = field(default_factory=Counter)
    # Nodes whose reads were redirected, by kind: counted where they are still in the stage's graph.
    redirected: dict[int, str] = field(default_factory=dict)

    @property
    def graph(self) -> gs.Graph:
        return self.model.graph

    @property
    def kinds(self) -> tuple[KVKind, ...]:
        return KV_KINDS if self.kv is not None else ()

    def incoming(self) -> list[gs.Variable]:
        """The stage's activation inputs, each read where its stream tensor was; a Shape of an
        earlier stage's hidden-shaped tensor reads the first."""
        if self.plan.first:
            return []
        crossing = self.flow.crossing(self.graph, self.plan.stage)
        inputs = [
            gs.Variable(activation_name(k), t.dtype, [BATCH, SEQUENCE, _hidden_size(t, self.plan.stage)])
            for k, t in enumerate(crossing)
        ]
        if not inputs:
            raise InputError(f"--pp: nothing of the stream crosses into stage {self.plan.stage}")
        by_name = {t.name: new for t, new in zip(crossing, inputs, strict=True)}
        hidden = int(inputs[0].shape[-1])
        for node in self.graph.nodes:
            for i, tensor in enumerate(node.inputs):
                if tensor.name in by_name:
                    node.inputs[i] = by_name[tensor.name]
                elif node.op in _SHAPE_ONLY and self._earlier(tensor) and _hidden_like(tensor, hidden):
                    node.inputs[i] = inputs[0]
                    self.redirected[id(node)] = "redirected_shapes"
        self.counts["activations_in"] += len(inputs)
        return inputs

    def _earlier(self, tensor: gs.Tensor) -> bool:
        made = self.flow.made_in(tensor)
        return made is not None and made < self.plan.stage

    def outgoing(self) -> list[gs.Tensor]:
        """The stage's outputs: the activations the next stage reads, or the last stage's own
        outputs (the logits), then the presents of its layers."""
        tensors = self.graph.tensors()
        names = [present_name(i, k) for i in self.plan.layers.layers for k in self.kinds]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise InputError(f"--pp: the graph has no {missing[0]!r} for stage {self.plan.stage}")
        presents = [tensors[n] for n in names]
        if self.plan.last:
            cache = set(self.kv.present_names) if self.kv is not None else set()
            return [t for t in self.graph.outputs if t.name not in cache] + presents
        crossing = self.flow.crossing(self.graph, self.plan.stage + 1)
        for k, tensor in enumerate(crossing):
            tensor.shape = [BATCH, SEQUENCE, _hidden_size(tensor, self.plan.stage + 1)]
            tensor.name = activation_name(k, out=True)
        self.counts["activations_out"] += len(crossing)
        return crossing + presents

    def redirect_past(self) -> None:
        """Nodes outside the stream that read another layer's past (its length) read the stage's first."""
        if self.kv is None:
            return
        first = self.plan.layers.first
        held = self.plan.layers.layers
        instead = {
            past_name(i, k): past_name(first, k) for i in range(self.kv.num_layers) if i not in held for k in KV_KINDS
        }
        inputs = {t.name: t for t in self.graph.inputs}
        for node in self.graph.nodes:
            if self.flow.of_node(node) is not None:
                continue
            for i, tensor in enumerate(node.inputs):
                if tensor.name in instead:
                    node.inputs[i] = inputs[instead[tensor.name]]
                    self.redirected[id(node)] = "redirected_past"

    def check(self) -> None:
        """Every stream node left is the stage's: else the stage would compute another's part."""
        for node in self.graph.nodes:
            stage = self.flow.of_node(node)
            if stage is not None and stage != self.plan.stage:
                raise InputError(
                    f"--pp: stage {self.plan.stage} would need {node.name} of stage {stage} "
                    f"(it reads {', '.join(t.name for t in node.inputs if t.name)})"
                )
            for tensor in node.inputs:
                if node.op in _SHAPE_ONLY and self._earlier(tensor):
                    raise InputError(
                        f"--pp: {node.name} reads the shape of {tensor.name!r} of an earlier stage, which is "
                        "not [batch, sequence, hidden]"
                    )

    def renumber(self) -> None:
        """The stage's cache tensors numbered from 0: an ordinary layout of its layers."""
        tensors = self.graph.tensors()
        for j, layer in enumerate(self.plan.layers.layers):
            for kind in self.kinds:
                for old, new in (
                    (past_name(layer, kind), past_name(j, kind)),
                    (present_name(layer, kind), present_name(j, kind)),
                ):
                    if old in tensors:
                        tensors[old].name = new
        self.counts["kv_tensors"] = 2 * len(self.kinds) * self.plan.layers.count


class PipelineParallelPass(GraphPass):
    """Cut the graph down to stage `plan.stage` of `plan.pp`."""

    name = "pipeline_parallel"
    runs_after = ("fuse_attention", "quantize", "kv_cache")

    def __init__(self, plan: StagePlan, kv: KVLayout | None) -> None:
        self.plan, self.kv = plan, kv

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        graph.toposort()
        before = len(graph.nodes)
        cut = _Cut(model, self.plan, self.kv, _Flow.of(graph, self.plan))
        incoming = cut.incoming()
        outgoing = cut.outgoing()
        cut.redirect_past()
        graph.inputs = [*incoming, *graph.inputs]
        graph.outputs = outgoing
        graph.cleanup().toposort()
        read = {t.name for node in graph.nodes for t in node.inputs}
        graph.inputs = [t for t in graph.inputs if t.name in read]
        cut.check()
        cut.renumber()
        cut.counts["layers"] = self.plan.layers.count
        cut.counts["kept_nodes"] = len(graph.nodes)
        cut.counts["replicated"] = sum(1 for n in graph.nodes if cut.flow.of_node(n) is None)
        cut.counts["dropped_nodes"] = before - len(graph.nodes)
        cut.counts.update(cut.redirected[id(n)] for n in graph.nodes if id(n) in cut.redirected)
        return PassResult(True, dict(cut.counts))
