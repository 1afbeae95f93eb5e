"""KV-cache passes: give a fused decoder graph KV-cache I/O, in either form of today's ONNX.

- insert: a cache-less graph (every layer's `Attention` reads the keys and values of the
  current tokens) gets past inputs and present outputs, named by llm2trt.core.kv;
- convert: a graph with a growing cache (the exporter's: `Concat(past, new)` feeding Attention
  and the present output) becomes a fixed-size buffer.

Growing: `present = Concat(past, new)`; the mask is the causal mask in cache slots (query i of S
new tokens sits at slot past + i) and the 2-D `attention_mask` over all slots (left padding).
Fixed: `present = TensorScatter(past, new, write_indices)` writes each row's new entries at its
position (rows are left-aligned in the buffer, so the position is the slot), and the mask allows
key slot j for a query at position p iff j <= p: no `attention_mask` input, nothing past a row's
position is read, whatever the buffer holds there. The explicit mask is used rather than
Attention's `nonpad_kv_seqlen` because TensorRT-RTX 1.7 treats that input as compile-time only
("Unused Input: seqlen").

Both need the fused `Attention` nodes (one per layer): they run after the fusion passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, numpy_of_onnx, onnx_elem_type
from llm2trt.core.errors import InputError
from llm2trt.core.kv import GROWING, KV_KINDS, KVKind, KVLayout, past_name, present_name
from llm2trt.passes.manager import POSITION_BIAS_KEY, GraphPass, Model, PassResult
from llm2trt.passes.pattern import attention_per_layer

TENSOR_SCATTER_OPSET = 24


_SLOTS: tuple[tuple[int, KVKind], ...] = ((1, "key"), (2, "value"))
_CACHE_OPS = {"Concat": GROWING, "TensorScatter": "buffer"}


@dataclass
class _Layer:
    """One layer's attention and the keys/values of the current tokens that feed its cache."""

    index: int
    attention: gs.Node
    new: dict[KVKind, gs.Tensor]  # (batch, kv_heads, sequence, head_dim)


class KVCachePass(GraphPass):
    """Insert KV-cache I/O of `layout.form` into a cache-less graph, or turn a growing cache fixed."""

    name = "kv_cache"
    runs_after: ClassVar[tuple[str, ...]] = ("fuse_attention", "opset_upgrade")

    def __init__(self, layout: KVLayout, insert: bool) -> None:
        self.layout = layout
        self.insert = insert
        self._biased: dict[tuple[str, str], gs.Variable] = {}

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        layers, cached = self._layers(model)
        if self.insert and cached:
            raise InputError("--kv-cache: this graph already has KV-cache I/O (convert made it with a cache)")
        if not self.insert and not cached:
            raise InputError("--kv-form: this graph has no KV cache; insert one with --kv-cache")
        if cached == ("buffer" if self.layout.is_buffer else GROWING):
            return PassResult(modified=False, counts={"layers": 0})  # already in the wanted form
        dtype = layers[0].attention.inputs[0].dtype
        if self.layout.is_buffer and model.opset < TENSOR_SCATTER_OPSET:
            raise InputError(
                f"a fixed-size KV cache needs opset {TENSOR_SCATTER_OPSET} (TensorScatter); graph is {model.opset}"
            )
        past = {
            (layer.index, kind): self._past_input(graph, layer.index, kind, dtype)
            for layer in layers
            for kind in KV_KINDS
        }
        write_at = self._write_indices(model) if self.layout.is_buffer else None
        masks: dict[int, gs.Variable] = {}  # by sliding window (0: global), made once each
        tensors = graph.tensors()  # the exporter's present outputs, found by name before new ones take it
        presents = []
        for layer in layers:
            for slot, kind in _SLOTS:
                present = self._update(model, tensors, layer, kind, past[(layer.index, kind)], write_at)
                layer.attention.inputs[slot] = present
                presents.append(present)
            window = self.layout.window(layer.index)
            if window not in masks:
                masks[window] = (
                    self._fixed_mask(model, past[(0, "key")], dtype, window)
                    if self.layout.is_buffer
                    else self._growing_mask(model, dtype, window)
                )
            _set_mask(layer.attention, self._with_position_bias(model, layer.attention, masks[window], dtype))
        graph.outputs = [t for t in graph.outputs if not t.name.startswith("present.")] + presents
        graph.cleanup(remove_unused_graph_inputs=False)
        used = {t.name for n in graph.nodes for t in n.inputs}
        graph.inputs = [t for t in graph.inputs if t.name in used or t.name.startswith("past_key_values.")]
        graph.toposort()
        counted = "caches_inserted" if self.insert else "caches_converted"
        return PassResult(modified=True, counts={counted: len(layers), "layers": len(layers)})

    # -- what the graph holds --------------------------------------------------------------------

    def _layers(self, model: Model) -> tuple[list[_Layer], str | None]:
        """Each layer's attention and new keys/values, and the cache the graph has: growing (a
        Concat), buffer (a TensorScatter) or None."""
        layers, forms = [], []
        for index, node in enumerate(attention_per_layer(model, self.layout.num_layers, "the KV-cache pass")):
            new: dict[KVKind, gs.Tensor] = {}
            for slot, kind in _SLOTS:
                tensor = node.inputs[slot]
                producer = tensor.inputs[0] if tensor.inputs and tensor.name == present_name(index, kind) else None
                form = _CACHE_OPS.get(producer.op) if producer is not None else None
                forms.append(form)
                # Concat(past, new) or TensorScatter(past, new, indices): the new entries are input 1.
                new[kind] = producer.inputs[1] if producer is not None and form is not None else tensor
            layers.append(_Layer(index, node, new))
        if len(set(forms)) > 1:
            raise InputError("the graph's KV cache covers only some layers; cannot rewrite it")
        return layers, forms[0]

    # -- the new tensors --------------------------------------------------------------------------

    def _past_input(self, graph: gs.Graph, layer: int, kind: KVKind, dtype: object) -> gs.Variable:
        name = past_name(layer, kind)
        existing = next((t for t in graph.inputs if t.name == name), None)
        shape = self.layout.shape(self.layout.past_dim)
        if existing is not None:
            existing.shape = shape
            return existing
        tensor = gs.Variable(name, dtype=dtype, shape=shape)
        graph.inputs.append(tensor)
        return tensor

    def _update(
        self,
        model: Model,
        tensors: dict[str, gs.Tensor],
        layer: _Layer,
        kind: KVKind,
        past: gs.Variable,
        write_at: gs.Variable | None,
    ) -> gs.Variable:
        """The present keys or values: Concat(past, new), or TensorScatter(past, new, write_at)."""
        name = present_name(layer.index, kind)
        old = tensors.get(name)
        if old is not None:  # the exporter's present output: give its name to the new tensor
            old.name = model.fresh_name(f"{name}/replaced")
        new = layer.new[kind]
        present = gs.Variable(name, dtype=new.dtype, shape=self.layout.shape(self.layout.present_dim))
        scope = f"{layer.attention.name.rsplit('/', 1)[0]}/kv_{kind}"
        op, inputs = ("TensorScatter", [past, new, write_at]) if write_at is not None else ("Concat", [past, new])
        node = gs.Node(op, model.fresh_name(f"{scope}/{op}"), attrs={"axis": 2}, inputs=inputs, outputs=[present])
        model.graph.nodes.append(node)
        model.tag(node, f"KVCache.{self.layout.form}")
        return present

    def _with_position_bias(self, model: Model, attention: gs.Node, mask: gs.Variable, dtype: object) -> gs.Tensor:
        """The new mask, plus the position bias the old mask input carried (ALiBi), if any: the
        bias reads the 2-D attention_mask, which now spans the cached tokens too."""
        name = model.node_metadata.get(attention.name, {}).get(POSITION_BIAS_KEY)
        if name is None:
            return mask
        bias = model.graph.tensors().get(name)
        if bias is None:
            raise InputError(f"the KV-cache pass lost the position bias {name!r} of {attention.name}")
        key = (bias.name, mask.name)
        if key not in self._biased:  # every layer reads the same bias: one Add per mask
            out = _Builder(model, "kv_cache/position_bias").op("Add", bias, mask)
            out.dtype = mask.dtype
            self._biased[key] = out
        return self._biased[key]

    def _write_indices(self, model: Model) -> gs.Variable:
        """Each row's first new slot: its first position (rows are left-aligned in the buffer)."""
        positions = _input(model.graph, "position_ids")
        out = gs.Variable("kv_cache/write_indices", dtype=np.int64, shape=["batch"])
        zero = gs.Constant(model.fresh_name("kv_cache/first"), np.asarray(0, dtype=np.int64))
        model.graph.nodes.append(
            gs.Node("Gather", "kv_cache/Gather_first_position", {"axis": 1}, [positions, zero], [out])
        )
        return out

    def _growing_mask(self, model: Model, dtype: object, window: int) -> gs.Variable:
        """(batch, 1, sequence, total) additive: causal in cache slots (and within `window` slots of
        the query, where the layer slides), and the 2-D attention_mask."""
        b = _Builder(model, "kv_cache/mask")
        attention_mask = _input(model.graph, "attention_mask")
        attention_mask.shape = ["batch", "total_sequence"]
        ids = _input(model.graph, "input_ids")
        total = b.op("Gather", b.op("Shape", attention_mask), b.const(1), axis=0)
        length = b.op("Gather", b.op("Shape", ids), b.const(1), axis=0)
        keys = b.op("Range", b.const(0), total, b.const(1))
        queries = b.op("Range", b.op("Sub", total, length), total, b.const(1))
        causal = b.causal(b.op("Unsqueeze", keys, b.const([0])), b.op("Unsqueeze", queries, b.const([1])), window)
        padding = b.op("Unsqueeze", b.op("Cast", attention_mask, to=DType.BOOL.onnx), b.const([1, 2]))
        allowed = b.op("And", b.op("Unsqueeze", causal, b.const([0, 1])), padding)
        return b.additive(allowed, dtype)

    def _fixed_mask(self, model: Model, buffer: gs.Variable, dtype: object, window: int) -> gs.Variable:
        """(batch, 1, sequence, cache) additive: key slot j is visible to a query at position p iff
        j <= p (and p - j < window, where the layer slides)."""
        b = _Builder(model, "kv_cache/mask")
        positions = _input(model.graph, "position_ids")
        slots = b.op("Range", b.const(0), b.op("Gather", b.op("Shape", buffer), b.const(2), axis=0), b.const(1))
        allowed = b.causal(
            b.op("Unsqueeze", slots, b.const([0, 1])), b.op("Unsqueeze", positions, b.const([2])), window
        )
        return b.additive(b.op("Unsqueeze", allowed, b.const([1])), dtype)


class _Builder:
    """Small node builder for the mask subgraph (one scope, fresh names)."""

    def __init__(self, model: Model, scope: str) -> None:
        self.model, self.scope = model, scope

    def const(self, value: int | list[int] | float, dtype: Any = np.int64) -> gs.Constant:
        return gs.Constant(self.model.fresh_name(f"{self.scope}/const"), np.asarray(value, dtype=dtype))

    def op(self, op: str, *inputs: gs.Tensor, **attrs: object) -> gs.Variable:
        out = gs.Variable(self.model.fresh_name(f"{self.scope}/{op}_output"))
        node = gs.Node(
            op, self.model.fresh_name(f"{self.scope}/{op}"), attrs=dict(attrs), inputs=list(inputs), outputs=[out]
        )
        self.model.graph.nodes.append(node)
        self.model.tag(node, "KVCache.mask")
        return out

    def causal(self, keys: gs.Tensor, queries: gs.Tensor, window: int) -> gs.Variable:
        """keys <= queries, and keys > queries - window for a sliding layer (broadcast)."""
        allowed = self.op("LessOrEqual", keys, queries)
        if window:
            recent = self.op("Greater", keys, self.op("Sub", queries, self.const(window)))
            allowed = self.op("And", allowed, recent)
        return allowed

    def additive(self, allowed: gs.Variable, dtype: object) -> gs.Variable:
        """0 where allowed, the dtype's lowest value elsewhere (a fully masked row stays finite)."""
        np_dtype = numpy_of_onnx(onnx_elem_type(dtype) or DType.FP32.onnx)
        lowest = float(np.finfo(np_dtype).min) if np.issubdtype(np_dtype, np.floating) else -3.0e38
        out = self.op("Where", allowed, self.const(0.0, np_dtype), self.const(lowest, np_dtype))
        out.dtype = np_dtype
        return out


def _set_mask(attention: gs.Node, mask: gs.Variable) -> None:
    while len(attention.inputs) < 4:
        attention.inputs.append(gs.Variable.empty())
    attention.inputs[3] = mask


def _input(graph: gs.Graph, name: str) -> gs.Variable:
    for tensor in graph.inputs:
        if tensor.name == name:
            return tensor
    raise InputError(f"the KV-cache pass needs graph input {name!r}, which this graph lacks")
