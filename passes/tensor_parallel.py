"""Tensor parallelism: rewrite an optimized decoder graph into one rank's graph.

Each linear layer and embedding the exporter spec names is sliced for the rank (`llm2trt.core.tp`):

- column-parallel (q/k/v by whole heads, gate/up, GPT-2's c_attn and Phi-3's qkv_proj by heads of
  each of q, k, v, Phi-3's gate_up_proj by matching columns of each half): the weight's output
  columns and the bias; shape constants that spell the full width downstream (GPT-2's Reshape to
  [batch, seq, 3*hidden] and its Split) are narrowed to the rank's width, and the constant Slices
  that take the parts out of a fused projection (Phi-3's q, k and v, gate and up) to the rank's
  part of each, with head reshapes that spell a head count;
- per-head data past the projections (up to the row-parallel layer): a float constant with an axis
  of the head count in attention's score bias (ALiBi's slopes) keeps the rank's heads, and Reshapes
  of per-head data whose target spells the head count ([b, s, heads, 3, d], [-1, heads, ...]) or
  batch*heads (a Mul by it, or a Div by it that gets the batch back) count the rank's heads; two
  entries that could each be the head count are refused;
- row-parallel (o_proj, down): the weight's input rows; the output becomes a partial sum, one
  all-reduce makes it whole, and a bias is added once, after it;
- vocab-parallel embedding: the rank's rows of the (padded) table, ids outside them masked to
  zero, an all-reduce; lm_head: the rank's vocabulary columns, the logits gathered from all ranks
  (along the first axis, which is what TensorRT's ALL_GATHER concatenates) and the padding dropped.

Norms, RoPE tables and everything else stay replicated. Collectives are `DistCollective` nodes
(domain `trt`), which TensorRT's ONNX parser builds into NCCL layers; ONNX Runtime has no such op,
so the rank harness (llm2trt.backends.onnxruntime.ranks) runs the graph between them and does the collective itself.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.kv import KVLayout
from llm2trt.core.lora import LoraShard
from llm2trt.core.tp import LayerSplit, Split, TPPlan, Units, padded, shard_experts, shard_vocab
from llm2trt.passes.lora_slots import bias_output, is_lora_add
from llm2trt.passes.lora_slots import input_names as lora_inputs
from llm2trt.passes.manager import GraphPass, Model, PassResult, read_values
from llm2trt.passes.ort_op_table import DOMAIN as MOE_DOMAIN
from llm2trt.passes.ort_op_table import MOE
from llm2trt.passes.pattern import layer_of, module_of
from llm2trt.passes.qdq import is_linear, reads_tied_weight, transposed_values

COLLECTIVE_OP, COLLECTIVE_DOMAIN = "DistCollective", "trt"
# Attributes that count heads, on attention-like nodes of 3-D (packed) form.
_Q_HEAD_ATTRS, _KV_HEAD_ATTRS = ("num_heads", "q_num_heads"), ("kv_num_heads",)
# Column splits whose outputs hold whole heads: what flows from them is per-head data.
_HEAD_UNITS = frozenset({Units.Q, Units.KV, Units.QKV, Units.QKV_BY_HEAD})
# The ops a score bias is built through (by input), back from where attention adds it: values
# are carried element for element, so a per-head constant among their inputs is the bias's.
_BIAS_PATH: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(("Add", "Sub", "Mul", "Div"), (0, 1)),
    **dict.fromkeys(
        ("Neg", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose", "Slice", "Gather"),
        (0,),
    ),
    "Tile": (0,),
    "Where": (1, 2),
    "Concat": None,  # every input
}
# Scalar shape arithmetic a Reshape target's entry is computed through.
_PASS_SCALAR = ("Unsqueeze", "Squeeze", "Cast", "Identity")


def is_collective(node: gs.Node | onnx.NodeProto) -> bool:
    op = node.op if isinstance(node, gs.Node) else node.op_type
    return op == COLLECTIVE_OP


def collective_kind(node: onnx.NodeProto) -> str:
    for attr in node.attribute:
        if attr.name == "collective_operation":
            return str(attr.s.decode())
    raise ValueError(f"{node.name}: a DistCollective without collective_operation")


def _values(tensor: gs.Tensor) -> np.ndarray | None:
    return read_values(tensor) if isinstance(tensor, gs.Constant) else None


def _weight(tensor: gs.Tensor) -> np.ndarray:
    """A split layer's weight, which the rules matched as a constant (or the transpose of one: a
    tied embedding's lm_head; each rank gets its own slice of it)."""
    tied = transposed_values(tensor)
    if tied is not None:
        return tied
    values = _values(tensor)
    if values is None:
        raise InputError(
            f"--tp: the weight {tensor.name!r} is computed in the graph, not a constant; it cannot be split"
        )
    return values


@dataclass
class _Rewrite:
    """One rank's rewrite of one graph."""

    model: Model
    plan: TPPlan
    counts: Counter[str] = field(default_factory=Counter)
    layers: dict[str, set[int]] = field(default_factory=lambda: {"column": set(), "row": set()})
    # Where per-head data starts (head-split projections' outputs), and the row-parallel layers
    # where it ends (their all-reduce makes whole tensors again).
    head_sources: list[gs.Tensor] = field(default_factory=list)
    row_nodes: set[str] = field(default_factory=set)
    lora_shards: dict[str, LoraShard] = field(default_factory=dict)  # module -> its adapters' cut

    @property
    def tp(self) -> int:
        return self.plan.mapping.tp

    def var(self, where: str, base: str, dtype: object = None) -> gs.Variable:
        return gs.Variable(self.model.fresh_name(f"{where}/{base}"), dtype=dtype)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return self.model.constant(self.model.fresh_name(base), values)

    def add(
        self,
        op: str,
        where: str,
        base: str,
        inputs: list[gs.Tensor],
        outputs: list[gs.Tensor],
        attrs: dict[str, object] | None = None,
        domain: str | None = None,
    ) -> None:
        """A new node (appended: the pass sorts the graph at the end)."""
        name = self.model.fresh_name(f"{where}/{base}")
        self.model.graph.nodes.append(gs.Node(op, name, attrs or {}, inputs, outputs, domain=domain))

    def collective(self, kind: str, x: gs.Variable, out: gs.Variable, where: str) -> None:
        attrs: dict[str, object] = {
            "collective_operation": kind,
            "reduce_op": "sum" if kind == "all_reduce" else "none",
            "root": -1,
            "group_size": 0,
            "nb_rank": self.tp,
        }
        self.add(COLLECTIVE_OP, where, kind, [x], [out], attrs, COLLECTIVE_DOMAIN)
        self.counts[kind] += 1

    def partial(self, node: gs.Node, what: str) -> tuple[gs.Variable, gs.Variable]:
        """Make the node write a new (partial) tensor; its old output is for the collective to make."""
        whole = node.outputs[0]
        part = gs.Variable(self.model.fresh_name(f"{whole.name}/{what}"), dtype=whole.dtype)
        node.outputs[0] = part
        return part, whole

    # -- linear layers ---------------------------------------------------------------------------

    def column(self, node: gs.Node, layer: LayerSplit) -> None:
        weight = _weight(node.inputs[1])
        index = self.plan.index(layer, weight.shape[1])
        add = _bias_add(node)  # before the weight narrows: the bias is as wide as the whole layer
        node.inputs[1] = self.const(f"{node.inputs[1].name}.rank", weight[:, index])
        out = node.outputs[0]
        if node.op == "Gemm" and len(node.inputs) > 2:
            node.inputs[2] = self._sliced_bias(node.inputs[2], index)
        elif add is not None:
            i = 1 if add.inputs[0] is out else 0
            add.inputs[i] = self._sliced_bias(add.inputs[i], index)
            out = add.outputs[0]
        lora = _lora_add(out)
        if lora is not None:  # the low-rank path's B narrows as the weight's columns do
            self._lora(node, lora, "b", index, 1)
            out = lora.outputs[0]
        for consumer in [c for c in out.outputs if c.inputs and c.inputs[0] is out]:
            if consumer.op == "Reshape":
                self._narrow_shape(consumer, weight.shape[1], len(index))
                for split in [c for c in consumer.outputs[0].outputs if c.op == "Split"]:
                    self._narrow_split(split, index)
            elif consumer.op == "Split" and _last_axis(out, int(consumer.attrs.get("axis", 0))):
                self._narrow_split(consumer, index)  # Phi-3's gate_up chunk, where exported as a Split
            elif consumer.op == "Slice":
                self._narrow_slice(consumer, index, weight.shape[1])  # Phi-3's q/k/v and gate/up parts
        if layer.units in _HEAD_UNITS:
            self.head_sources.append(out)
        self.counts["column"] += 1
        self._seen("column", node)

    def row(self, node: gs.Node, layer: LayerSplit) -> None:
        weight = _weight(node.inputs[1])
        index = self.plan.index(layer, weight.shape[0])
        node.inputs[1] = self.const(f"{node.inputs[1].name}.rank", weight[index, :])
        source = node.inputs[0]
        if len(source.inputs) == 1 and source.inputs[0].op == "Reshape":
            self._narrow_shape(source.inputs[0], weight.shape[0], len(index))
        where = _scope(node)
        # A Gemm's bias goes after the sum, added once (a MatMul's bias Add already is after it).
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
        node.inputs = node.inputs[:2]
        part, whole = self.partial(node, "partial")
        lora = _lora_add(whole) or _lora_add(bias_output(whole))
        if lora is not None:  # A narrows as the weight's rows; its partial output joins the sum
            self._lora(node, lora, "a", index, 2)
            part = self._lora_before_sum(lora, part, where)
        summed = whole if bias is None else self.var(where, "summed", whole.dtype)
        self.collective("all_reduce", part, summed, where)
        if bias is not None:
            self.add("Add", where, "bias_after_all_reduce", [summed, bias], [whole])
        self.counts["row"] += 1
        self.row_nodes.add(node.name)
        self._seen("row", node)

    def _lora(self, node: gs.Node, add: gs.Node, weight: str, index: np.ndarray, axis: int) -> None:
        """Narrow the adapter input (A's in axis, B's out axis) of the path `add` ends; recorded
        for the sessions, which cut each adapter the same way."""
        module = module_of(node.name)
        a_name, b_name = lora_inputs(module)
        name = a_name if weight == "a" else b_name
        tensor = next((t for t in self.model.graph.inputs if t.name == name), None)
        if tensor is None or tensor.shape is None:
            raise InputError(f"--tp: the low-rank path of {module} has no adapter input {name}")
        shape = list(tensor.shape)
        shape[axis] = len(index)
        tensor.shape = shape
        for reshape in self._lora_shapes(tensor, add, weight):
            values = np.array(reshape.inputs[1].values)
            values[-1 if weight == "a" else 1] = len(index)
            reshape.inputs[1] = self.const(f"{reshape.inputs[1].name}.rank", values)
        self.lora_shards[module] = LoraShard.of(weight, index)
        self.counts["lora"] += 1

    @staticmethod
    def _lora_shapes(adapter: gs.Tensor, add: gs.Node, weight: str) -> list[gs.Node]:
        """The path's Reshapes that spell the narrowed width, walked to from the adapter input (as
        passes/lora_slots.py builds the path): A -> Reshape [N*R, in]; B -> Transpose -> Reshape
        [N*R, out], and for a Gemm's flat rows the Reshape [-1, out] that makes the path's output."""
        first: gs.Node = adapter.outputs[0]
        if weight == "a":
            return [first]
        shapes: list[gs.Node] = [first.outputs[0].outputs[0]]
        out = add.inputs[1]
        if out.inputs and out.inputs[0].op == "Reshape":
            shapes.append(out.inputs[0])
        return shapes

    def _lora_before_sum(self, add: gs.Node, part: gs.Variable, where: str) -> gs.Variable:
        """Move a row-parallel layer's low-rank output before its all-reduce: the path's Add takes
        the partial sum; where it stood, its base input passes through."""
        base = add.inputs[0] if module_of(add.inputs[1].name).endswith(".lora") else add.inputs[1]
        d = add.inputs[1] if base is add.inputs[0] else add.inputs[0]
        total = add.outputs[0]
        add.inputs = [part, d]
        summed = self.var(where, "partial_with_lora", part.dtype)
        add.outputs = [summed]
        for consumer in list(total.outputs):
            consumer.inputs = [base if t is total else t for t in consumer.inputs]
        graph = self.model.graph
        graph.outputs = [base if t is total else t for t in graph.outputs]
        return summed

    def _seen(self, kind: str, node: gs.Node) -> None:
        layer = layer_of(module_of(node.name))
        if layer is not None:
            self.layers[kind].add(layer)

    def _sliced_bias(self, bias: gs.Tensor, index: np.ndarray) -> gs.Tensor:
        values = _values(bias)
        if values is None or values.ndim != 1:
            raise InputError(f"--tp: the bias {bias.name!r} of a column-parallel layer is not a constant vector")
        return self.const(f"{bias.name}.rank", values[index])

    def _narrow_shape(self, reshape: gs.Node, full: int, local: int) -> None:
        """A Reshape target that spells the full width last ([-1, 256], [b, s, 192]) gets the rank's,
        and one that spells it as heads of a size ([b, s, 4, 16] for 64) the rank's heads."""
        shape = reshape.inputs[1]
        values = _values(shape)
        if values is not None:
            narrowed = _narrowed_target([int(v) for v in values.reshape(-1)], full, local)
            if narrowed is not None:
                reshape.inputs[1] = self.const(f"{shape.name}.rank", np.asarray(narrowed, dtype=values.dtype))
            return
        concat = shape.inputs[0] if len(shape.inputs) == 1 else None
        if concat is None or concat.op != "Concat":
            return
        # The target's trailing entries that are one-element constants (batch and sequence come
        # from the graph); only those can spell the width.
        tail: list[tuple[int, np.ndarray]] = []
        for i in range(len(concat.inputs) - 1, -1, -1):
            value = _values(concat.inputs[i])
            if value is None or value.size != 1 or len(tail) == 2:
                break
            tail.insert(0, (i, value))
        narrowed = _narrowed_target([int(v.reshape(-1)[0]) for _, v in tail], full, local)
        for (i, value), new in zip(tail, narrowed or [], strict=False):
            if int(value.reshape(-1)[0]) != new:
                concat.inputs[i] = self.const(f"{concat.inputs[i].name}.rank", np.full_like(value, new))

    def _narrow_slice(self, node: gs.Node, index: np.ndarray, full: int) -> None:
        """A Slice of a column-parallel output's features ([start, end) of the whole layer's) gets
        the rank's part of them: the local positions of the rank's features in that range, which
        are contiguous because the rank keeps its features in order. A head reshape of the part
        ([b, s, heads, head_dim]) then counts the rank's heads of it."""
        data = node.inputs[0]
        inputs = [*node.inputs[1:5], *[None] * (5 - len(node.inputs))]
        present = [t is not None and not t.is_empty() for t in inputs]
        starts, ends, axes, steps = (_values(t) if given else None for t, given in zip(inputs, present, strict=True))
        if axes is not None and not any(_last_axis(data, int(a)) for a in axes):
            return  # it slices another axis (positions), which the split leaves whole
        computed = any(given and v is None for given, v in zip(present, (starts, ends, axes, steps), strict=True))
        if starts is None or ends is None or computed:
            raise InputError(
                f"--tp: {node.name} slices the column-parallel output {data.name!r} by bounds computed in "
                "the graph; only constant bounds can be narrowed to a rank's features"
            )
        axes = axes if axes is not None else np.arange(starts.size)
        steps = steps if steps is not None else np.ones(starts.size, dtype=np.int64)
        features = [i for i, axis in enumerate(axes) if _last_axis(data, int(axis))]
        if not features:
            return
        [i] = features
        if int(steps[i]) != 1:
            raise InputError(f"--tp: {node.name} slices the column-parallel output {data.name!r} with a step")
        if np.any(np.diff(index) <= 0):
            raise InputError(f"--tp: {node.name} slices features the rank does not keep in order")
        start, end = (min(max(int(v) + (full if int(v) < 0 else 0), 0), full) for v in (starts[i], ends[i]))
        local_starts, local_ends = starts.copy(), ends.copy()
        local_starts[i], local_ends[i] = np.searchsorted(index, start), np.searchsorted(index, end)
        node.inputs[1] = self.const(f"{node.inputs[1].name}.rank", local_starts)
        node.inputs[2] = self.const(f"{node.inputs[2].name}.rank", local_ends)
        self.counts["narrowed_slices"] += 1
        part = node.outputs[0]
        for reshape in [c for c in part.outputs if c.op == "Reshape" and c.inputs[0] is part]:
            self._narrow_shape(reshape, max(end - start, 0), int(local_ends[i] - local_starts[i]))

    def _narrow_split(self, split: gs.Node, index: np.ndarray) -> None:
        sizes = _values(split.inputs[1]) if len(split.inputs) > 1 else None
        if sizes is None:
            return
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        local = [int(((index >= a) & (index < b)).sum()) for a, b in itertools.pairwise(bounds)]
        split.inputs[1] = self.const(f"{split.inputs[1].name}.rank", np.asarray(local, dtype=sizes.dtype))

    # -- heads past the projections -------------------------------------------------------------

    def head_tables(self) -> None:
        """Float constants with an axis of the head count that attention adds to its scores (ALiBi's
        slopes, one per head) keep the rank's heads. They are found back from the bias input of a
        fused Attention and from what a Softmax normalizes, through `_BIAS_PATH`: never through a
        MatMul, so q, k and the tables that rotate them are not reached."""
        heads = self.plan.heads.heads
        keep = np.asarray(self.plan.heads.q_heads(self.plan.mapping))
        graph = self.model.graph
        stack = [n.inputs[3] for n in graph.nodes if n.op == "Attention" and len(n.inputs) > 3]
        stack += [n.inputs[0] for n in graph.nodes if n.op == "Softmax"]
        sliced: dict[str, gs.Constant] = {}  # one slice of a constant read by several nodes
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor.name in seen or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
                continue
            seen.add(tensor.name)
            node = tensor.inputs[0]
            if node.op not in _BIAS_PATH:
                continue
            slots = _BIAS_PATH[node.op] or range(len(node.inputs))
            for slot in (s for s in slots if s < len(node.inputs)):
                source = node.inputs[slot]
                if not isinstance(source, gs.Constant):
                    stack.append(source)
                    continue
                axis = _head_axis(source, heads)
                if axis is None:
                    continue
                if source.name not in sliced:
                    values = np.take(read_values(source), keep, axis=axis)
                    sliced[source.name] = self.const(f"{source.name}.rank", values)
                    self.counts["head_tables"] += 1
                node.inputs[slot] = sliced[source.name]
                self.head_sources.append(node.outputs[0])

    def head_views(self, sources: list[gs.Tensor]) -> None:
        """Reshapes of per-head data (from the head-split projections, the past cache and the
        sliced per-head constants, up to the row-parallel layers) whose target spells the head
        count or batch*heads: the rank's heads (`_head_view`)."""
        per_head: set[str] = set()
        stack = [*self.head_sources, *sources]
        while stack:
            tensor = stack.pop()
            if tensor.name in per_head:
                continue
            per_head.add(tensor.name)
            for consumer in tensor.outputs:
                # A Shape reads sizes (the rank's, now), and a row-parallel layer's output is whole.
                if consumer.op != "Shape" and consumer.name not in self.row_nodes:
                    stack += consumer.outputs
        for node in list(self.model.graph.nodes):
            if node.op == "Reshape" and node.inputs[0].name in per_head:
                self._head_view(node)

    def _head_view(self, reshape: gs.Node) -> None:
        """A constant target entry equal to the head count (not the last: that is the features) and
        a Mul or Div by it in a computed entry ([batch*heads, -1, d], [batch*heads/heads, heads, s,
        d]) become the rank's head count."""
        heads, local = self.plan.heads.heads, self.plan.local_heads[0]
        target = reshape.inputs[1]
        if isinstance(target, gs.Constant):
            pieces = [(reshape, 1)]
        elif len(target.inputs) == 1 and target.inputs[0].op == "Concat":
            concat = target.inputs[0]
            pieces = [(concat, i) for i in range(len(concat.inputs))]
        else:
            return
        counts: list[tuple[gs.Node, int, int]] = []  # constant entries equal to the head count
        factors: list[tuple[gs.Node, int]] = []  # Mul/Div operands equal to it
        for k, (owner, slot) in enumerate(pieces):
            values = _values(owner.inputs[slot])
            if values is None:
                factors += _head_factors(owner.inputs[slot], heads)
                continue
            if not np.issubdtype(values.dtype, np.integer):
                return
            flat = values.reshape(-1)
            entries = flat.size - 1 if k == len(pieces) - 1 else flat.size
            counts += [(owner, slot, i) for i in range(entries) if int(flat[i]) == heads]
        if len(counts) > 1:
            raise InputError(
                f"--tp: {reshape.name} views per-head data with {len(counts)} entries equal to the head count "
                f"({heads}); which one counts heads is unknown, so it cannot be narrowed to the rank's {local}"
            )
        for owner, slot, i in counts:
            old = owner.inputs[slot]
            values = read_values(old)
            flat = values.reshape(-1).copy()
            flat[i] = local
            owner.inputs[slot] = self.const(f"{old.name}.rank", flat.reshape(values.shape))
        for node, slot in factors:
            old = node.inputs[slot]
            # A scalar stays one (Model.constant would make it a vector: Mul's output would gain an axis).
            values = np.full_like(read_values(old), local)
            name = self.model.fresh_name(f"{old.name}.rank")
            node.inputs[slot] = gs.Constant(name, values) if values.ndim == 0 else self.const(name, values)
        if counts or factors:
            self.counts["head_views"] += 1

    # -- experts ---------------------------------------------------------------------------------

    def experts(self, node: gs.Node) -> None:
        """A MoE node keeps the rank's experts (core.tp.shard_experts); its output, the rank's
        share of the mix, becomes whole through one all-reduce."""
        slots = [MOE.inputs.index("GateUp"), MOE.inputs.index("Down")]
        gate_up, down = (_weight(node.inputs[i]) for i in slots)
        local_gate_up, local_down, first = shard_experts(gate_up, down, self.plan.mapping)
        for slot, values in zip(slots, (local_gate_up, local_down), strict=True):
            node.inputs[slot] = self.const(f"{node.inputs[slot].name}.rank", values)
        node.attrs["first_expert"] = int(node.attrs.get("first_expert", 0)) + first
        part, whole = self.partial(node, "experts_part")
        self.collective("all_reduce", part, whole, _scope(node))
        self.counts["experts"] += 1

    # -- vocabulary ------------------------------------------------------------------------------

    def embedding(self, node: gs.Node) -> None:
        """Gather(table, ids) over the rank's rows: ids outside them read row 0 and are zeroed."""
        table = _weight(node.inputs[0])
        local = shard_vocab(table, self.plan.mapping, axis=0)
        per = local.shape[0]
        ids = node.inputs[1]
        index_type = np.int32 if ids.dtype is not None and DType.find(ids.dtype) is DType.INT32 else np.int64
        where = _scope(node)
        shifted, low, high, inside, safe, mask = (
            self.var(where, n) for n in ("shifted", "low", "high", "inside", "safe", "mask")
        )
        fmask, masked = self.var(where, "fmask", table.dtype), self.var(where, "masked", table.dtype)
        start = self.const(f"{where}/vocab_start", np.asarray(self.plan.mapping.rank * per, dtype=index_type))
        zero = self.const(f"{where}/zero", np.asarray(0, dtype=index_type))
        size = self.const(f"{where}/per", np.asarray(per, dtype=index_type))
        axes = self.const(f"{where}/last_axis", np.asarray([-1], dtype=np.int64))
        self.add("Sub", where, "vocab_shift", [ids, start], [shifted])
        self.add("GreaterOrEqual", where, "vocab_low", [shifted, zero], [low])
        self.add("Less", where, "vocab_high", [shifted, size], [high])
        self.add("And", where, "vocab_inside", [low, high], [inside])
        self.add("Where", where, "vocab_safe", [inside, shifted, zero], [safe])
        self.add("Unsqueeze", where, "vocab_mask", [inside, axes], [mask])
        self.add("Cast", where, "vocab_fmask", [mask], [fmask], {"to": DType.parse(table.dtype).onnx})
        node.inputs = [self.const(f"{node.inputs[0].name}.rank", local), safe]
        gathered, whole = self.partial(node, "rows")
        self.add("Mul", where, "vocab_zero", [gathered, fmask], [masked])
        self.collective("all_reduce", masked, whole, where)
        self.counts["embedding"] += 1

    def lm_head(self, node: gs.Node) -> None:
        """The rank's vocabulary columns; logits gathered along a leading vocab axis, then put back."""
        weight = _weight(node.inputs[1])
        vocab = weight.shape[1]
        node.inputs[1] = self.const(f"{node.inputs[1].name}.rank", shard_vocab(weight, self.plan.mapping, 1))
        part, whole = self.partial(node, "vocab_part")
        rank = len(whole.shape) if whole.shape is not None else 3
        where = _scope(node)
        front, gathered = self.var(where, "vocab_first", whole.dtype), self.var(where, "gathered", whole.dtype)
        self.add("Transpose", where, "vocab_first", [part], [front], {"perm": [rank - 1, *range(rank - 1)]})
        self.collective("all_gather", front, gathered, where)
        pads = padded(vocab, self.tp) != vocab
        back = self.var(where, "vocab_last", whole.dtype) if pads else whole
        self.add("Transpose", where, "vocab_last", [gathered], [back], {"perm": [*range(1, rank), 0]})
        if pads:
            bounds = [
                self.const(f"{where}/vocab_{n}", np.asarray([v], dtype=np.int64))
                for n, v in (("s", 0), ("e", vocab), ("a", -1))
            ]
            self.add("Slice", where, "drop_vocab_padding", [back, *bounds], [whole])
        self.counts["lm_head"] += 1


def _scope(node: gs.Node) -> str:
    """The node's module path, where the nodes a rewrite adds for it are named."""
    return str(node.name).rsplit("/", 1)[0]


def _narrowed_target(tail: list[int], full: int, local: int) -> list[int] | None:
    """The trailing entries of a Reshape target narrowed from a `full`-wide axis to a `local` one:
    [..., full] -> [..., local]; [..., heads, size] with heads * size == full -> the local heads.
    None when they spell neither (-1 for the heads, say: it adapts by itself)."""
    if tail and tail[-1] == full:
        return [*tail[:-1], local]
    if len(tail) >= 2 and tail[-2] > 0 and tail[-1] > 0 and tail[-2] * tail[-1] == full and local % tail[-1] == 0:
        return [*tail[:-2], local // tail[-1], tail[-1]]
    return None


def _head_axis(constant: gs.Constant, heads: int) -> int | None:
    """The axis of a float constant that counts heads: the one axis of that size (more is refused)."""
    shape = [int(d) for d in constant.shape or ()]
    if constant.dtype is None or not np.issubdtype(np.dtype(constant.dtype), np.floating):
        return None
    axes = [i for i, d in enumerate(shape) if d == heads]
    if len(axes) > 1:
        raise InputError(
            f"--tp: the constant {constant.name!r} {shape} of an attention score bias has {len(axes)} axes of the "
            f"head count ({heads}); which one counts heads is unknown"
        )
    return axes[0] if axes else None


def _head_factors(tensor: gs.Tensor, heads: int) -> list[tuple[gs.Node, int]]:
    """The Mul and Div operands (node, input) equal to the head count in a scalar shape
    computation (batch * heads; batch * heads / heads gets the batch back)."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return []
    node = tensor.inputs[0]
    if node.op in _PASS_SCALAR:
        return _head_factors(node.inputs[0], heads)
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return []
    found: list[tuple[gs.Node, int]] = []
    for slot, operand in enumerate(node.inputs):
        values = _values(operand)
        if values is None:
            found += _head_factors(operand, heads)
        elif (
            (node.op == "Mul" or slot == 1)
            and values.size == 1
            and np.issubdtype(values.dtype, np.integer)
            and int(values.reshape(-1)[0]) == heads
        ):
            found.append((node, slot))
    return found


def _last_axis(tensor: gs.Tensor, axis: int) -> bool:
    """`axis` is the tensor's last (its features): -1, or rank - 1 where the rank is known."""
    return axis == -1 or (tensor.shape is not None and axis == len(tensor.shape) - 1)


def _lora_add(tensor: gs.Tensor | None) -> gs.Node | None:
    """The low-rank path's Add on `tensor`, if that is its only consumer."""
    if tensor is None or len(tensor.outputs) != 1:
        return None
    consumer: gs.Node = tensor.outputs[0]
    return consumer if is_lora_add(consumer) else None


def _bias_add(node: gs.Node) -> gs.Node | None:
    """The Add that adds a constant bias to a MatMul's output, if that is its only consumer."""
    consumers = node.outputs[0].outputs
    if len(consumers) != 1 or consumers[0].op != "Add":
        return None
    add = consumers[0]
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    values = _values(other)
    width = _values(node.inputs[1])
    return add if values is not None and width is not None and values.shape == (width.shape[1],) else None


class TensorParallelPass(GraphPass):
    """Rewrite the graph into rank `plan.mapping.rank`'s of `plan.mapping.tp`."""

    name = "tensor_parallel"
    runs_after = ("fuse_attention", "quantize", "kv_cache")

    def __init__(self, plan: TPPlan, kv: KVLayout | None, num_layers: int) -> None:
        self.plan, self.kv, self.num_layers = plan, kv, num_layers
        self.lora_shards: dict[str, LoraShard] = {}  # module -> its adapters' cut, once run

    def run(self, model: Model) -> PassResult:
        if any(n.op == "DequantizeLinear" for n in model.graph.nodes):
            raise InputError(
                "--tp: this graph is quantized; split the unquantized artifact (quantizing ranks is not built yet)"
            )
        if any(n.domain == "com.microsoft" for n in model.graph.nodes):
            raise InputError(
                "--tp: ONNX Runtime's com.microsoft ops (the gqa cache form) are not split; "
                "use a growing or fixed cache"
            )
        rewrite = _Rewrite(model, self.plan)
        self.lora_shards = rewrite.lora_shards
        for node in list(model.graph.nodes):
            self._node(rewrite, node)
        rewrite.head_tables()
        past = {*self.kv.past_names} if self.kv is not None else set()
        rewrite.head_views([t for t in model.graph.inputs if t.name in past])
        self._heads(rewrite)
        self._check(rewrite)
        # Intermediate shapes changed; shape inference (last in the pipeline) types them again.
        io = {t.name for t in (*model.graph.inputs, *model.graph.outputs)}
        for tensor in model.graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in io:
                tensor.shape = None
        model.graph.cleanup().toposort()
        return PassResult(True, dict(rewrite.counts))

    def _node(self, rewrite: _Rewrite, node: gs.Node) -> None:
        if node.domain == MOE_DOMAIN and node.op == MOE.name:
            rewrite.experts(node)
            return
        layer = self.plan.of(module_of(node.name))
        if layer is None:
            return
        if layer.split is Split.VOCAB:
            if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant):
                rewrite.embedding(node)
            elif is_linear(node) or reads_tied_weight(node):
                rewrite.lm_head(node)
        elif is_linear(node):
            (rewrite.column if layer.split is Split.COLUMN else rewrite.row)(node, layer)

    def _heads(self, rewrite: _Rewrite) -> None:
        """Head counts in attributes (packed attention forms) and in the cache's I/O shapes."""
        q, kv = self.plan.local_heads
        for node in rewrite.model.graph.nodes:
            for attr in _Q_HEAD_ATTRS:
                if attr in node.attrs:
                    node.attrs[attr] = q
            for attr in _KV_HEAD_ATTRS:
                if attr in node.attrs:
                    node.attrs[attr] = kv
        if self.kv is None:
            return
        names = {*self.kv.past_names, *self.kv.present_names}
        for tensor in (*rewrite.model.graph.inputs, *rewrite.model.graph.outputs):
            if tensor.name in names and tensor.shape is not None:
                tensor.shape = [tensor.shape[0], kv, *tensor.shape[2:]]
        rewrite.counts["kv_tensors"] += len(names)

    def _check(self, rewrite: _Rewrite) -> None:
        """Every layer split both ways, the embedding and lm_head once: else the graph would run, and
        be right, on every rank without being split at all."""
        layers = set(range(self.num_layers))
        for kind in ("column", "row"):
            if rewrite.layers[kind] != layers:
                missing = sorted(layers - rewrite.layers[kind])
                raise InputError(
                    f"--tp: no {kind}-parallel linear layer found in layers {missing[:8]} (is it fused or renamed?)"
                )
        for kind in ("embedding", "lm_head"):
            if rewrite.counts[kind] != 1:
                raise InputError(f"--tp: found {rewrite.counts[kind]} vocab-parallel {kind} nodes, expected 1")
