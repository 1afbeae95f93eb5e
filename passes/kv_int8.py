"""An INT8 KV cache for the fast CUDA form (`optimize --kv-form gqa --kv-dtype int8`).

After the gqa form's attention is llm2trt's op (`passes/ort_ops.py`), each attention node becomes
its Int8KV twin (`passes/ort_op_table.py`): the cache buffers, graph inputs and outputs alike, are
int8, and the node takes the layer's static scales per KV head and channel (calibrated on text
before the pipeline runs: `llm2trt/optimize/kv_scales.py`). A decode step then reads half the
cache bytes, which at long contexts is a large share of what it reads.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.errors import InputError
from llm2trt.passes.manager import GraphPass, Model, PassResult
from llm2trt.passes.ort_op_table import DOMAIN, INT8_CACHE
from llm2trt.passes.ort_ops import add_functions

Scales = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (key, value) scales [kv_heads, head_dim]
_LAYER = re.compile(r"past_key_values\.(\d+)\.key$")


class Int8CachePass(GraphPass):
    """llm2trt's attention ops -> their INT8-cache twins; the cache I/O int8."""

    name = "kv_int8"
    runs_after: ClassVar[tuple[str, ...]] = ("ort_kernels",)

    def __init__(self, scales: Scales) -> None:
        self.scales = scales

    def run(self, model: Model) -> PassResult:
        attention = [n for n in model.graph.nodes if n.domain == DOMAIN and n.op in INT8_CACHE]
        float_cache = [n for n in model.graph.nodes if n.op == "GroupQueryAttention" and n.domain != DOMAIN]
        if float_cache or not attention:
            raise InputError(
                "--kv-dtype int8: every attention layer must run llm2trt's attention op "
                f"({len(float_cache)} left to ONNX Runtime's GroupQueryAttention; see optimize's ort_kernels counts)"
            )
        for node in attention:
            layer = self._layer(node)
            key, value = self.scales[layer]
            for index in (1, 2):  # PastKey, PastValue: graph inputs, bound to the outputs in place
                node.inputs[index].dtype = np.int8
            for out in node.outputs[1:3]:
                out.dtype = np.int8
            node.inputs += [
                gs.Constant(model.fresh_name(f"kv_int8/layer{layer}.key_scale"), key.astype(np.float32)),
                gs.Constant(model.fresh_name(f"kv_int8/layer{layer}.value_scale"), value.astype(np.float32)),
            ]
            node.op = INT8_CACHE[node.op].name
            model.tag(node, f"ORT.{node.op}")
        add_functions(model, sorted({n.op for n in attention}))
        return PassResult(True, {"int8_caches": 2 * len(attention), "layers": len(attention)})

    def _layer(self, node: gs.Node) -> int:
        found = _LAYER.match(node.inputs[1].name)
        if found is None or int(found.group(1)) not in self.scales:
            raise InputError(f"--kv-dtype int8: cannot tell which layer's cache {node.inputs[1].name!r} is")
        return int(found.group(1))
