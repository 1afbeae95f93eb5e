"""Runtime LoRA (`optimize --lora-slots N --lora-max-rank R`): beside each target linear layer, a
low-rank path whose adapter weights are graph inputs, so one graph (and one engine) serves many
adapters and a batch mixes them.

Per target `y = x @ W`: inputs A [N, R, in] and B [N, out, R] (adapters stacked by slot, ranks
zero-padded to R, the scale folded into B: see llm2trt/core/lora.py) and the graph's `lora_slot`
[batch] (each row's slot, -1 for none). In standard ONNX, every slot at once:

    t = x @ reshape(A, [N*R, in])^T          [batch, seq, N*R]
    t = t * mask                             mask [batch, 1, N*R]: 1 over the row's slot's R columns
    y = y + t @ reshape(B^T, [N*R, out])     [batch, seq, out]

which is exact for a row's adapter (its columns alone survive the mask) and zero for a row with
none. Its cost grows with N * R columns, small beside the layer's own in * out; a CUDA kernel reads
only the row's slot. The path sits after the base output (and its bias), so a layer whose weights
are quantized keeps them quantized and the adapter runs in the activations' float type.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.kv import BATCH
from llm2trt.core.lora import SLOT_INPUT, LoraSlots, LoraTarget
from llm2trt.passes.manager import GraphPass, Model, PassResult
from llm2trt.passes.pattern import layer_of, module_of

LINEAR_OPS = ("MatMul", "Gemm")


def input_names(module: str) -> tuple[str, str]:
    """The A and B inputs of a target module."""
    return f"lora.{module}.a", f"lora.{module}.b"


def _weight_shape(node: gs.Node) -> tuple[int, int] | None:
    """[in, out] of a linear node's weight: a constant, or a DequantizeLinear of one (quantized)."""
    if len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if isinstance(w, gs.Variable) and len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear":
        w = w.inputs[0].inputs[0]
    if not isinstance(w, gs.Constant) or len(w.shape) != 2:
        return None
    rows, cols = (int(d) for d in w.shape)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
            return None
        return (cols, rows) if node.attrs.get("transB", 0) else (rows, cols)
    return rows, cols


class LoraPass(GraphPass):
    """Low-rank paths beside the target linear layers, with the adapters as graph inputs."""

    name = "lora"

    def __init__(self, slots: int, max_rank: int, targets: tuple[str, ...] = ()) -> None:
        if slots < 1 or max_rank < 1:
            raise InputError("--lora-slots and --lora-max-rank must be at least 1")
        self.slots, self.max_rank, self.targets = slots, max_rank, targets
        self.record: LoraSlots | None = None  # what the graph takes, once run
        self.dtype: type = np.float32  # the adapter inputs' float type (the activations'), once run

    def _wanted(self, module: str) -> bool:
        if layer_of(module) is None:  # inside the decoder layers only (not lm_head)
            return False
        leaf = module.rsplit(".", 1)[-1]
        return not self.targets or any(leaf == t or re.fullmatch(t, module) for t in self.targets)

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        found: list[tuple[gs.Node, str, tuple[int, int]]] = []
        for node in graph.nodes:
            if node.op not in LINEAR_OPS:
                continue
            module = module_of(node.name)
            shape = _weight_shape(node)
            if shape is not None and self._wanted(module):
                found.append((node, module, shape))
        modules = [m for _n, m, _s in found]
        if len(set(modules)) != len(modules):
            raise InputError(f"--lora-slots: a module holds two linear layers ({_first_repeat(modules)})")
        if not found:
            wanted = ", ".join(self.targets) or "any linear layer inside the decoder layers"
            raise InputError(f"--lora-slots: no linear layer matches {wanted}")
        if self.targets:
            leaves = {m.rsplit(".", 1)[-1] for m in modules}
            unmatched = [t for t in self.targets if t not in leaves and not any(re.fullmatch(t, m) for m in modules)]
            if unmatched:
                raise InputError(f"--lora-targets: no linear layer inside the decoder layers is {', '.join(unmatched)}")
        dtype = self.dtype = _float_type(found[0][0])
        slot = gs.Variable(SLOT_INPUT, dtype=np.int64, shape=[BATCH])
        graph.inputs.append(slot)
        mask = self._mask(model, slot, dtype)
        targets = []
        for node, module, (fan_in, fan_out) in found:
            targets.append(self._path(model, node, module, fan_in, fan_out, slot, mask, dtype))
        self.record = LoraSlots(self.slots, self.max_rank, targets)
        graph.cleanup().toposort()
        return PassResult(True, {"lora_layers": len(targets), "adapter_inputs": 2 * len(targets)})

    def _mask(self, model: Model, slot: gs.Variable, dtype: type) -> gs.Variable:
        """[batch, 1, N*R]: ones over each row's slot's R columns."""
        n, r = self.slots, self.max_rank
        graph = model.graph
        base = "/lora/mask"
        column = gs.Variable(model.fresh_name(f"{base}/slot_column"), dtype=np.int64)
        graph.layer(
            op="Unsqueeze",
            name=model.fresh_name(f"{base}/Unsqueeze"),
            inputs=[slot, gs.Constant(model.fresh_name(f"{base}/axis"), np.array([1], dtype=np.int64))],
            outputs=[column],
        )
        hit = gs.Variable(model.fresh_name(f"{base}/hit"), dtype=np.bool_)
        slots = gs.Constant(model.fresh_name(f"{base}/slots"), np.arange(n, dtype=np.int64))
        graph.layer(op="Equal", name=model.fresh_name(f"{base}/Equal"), inputs=[column, slots], outputs=[hit])
        onehot = gs.Variable(model.fresh_name(f"{base}/onehot"), dtype=dtype)
        graph.layer(
            op="Cast",
            name=model.fresh_name(f"{base}/Cast"),
            inputs=[hit],
            outputs=[onehot],
            attrs={"to": _onnx_type(dtype)},
        )
        cube = gs.Variable(model.fresh_name(f"{base}/cube"), dtype=dtype)  # [batch, N, 1]
        graph.layer(
            op="Unsqueeze",
            name=model.fresh_name(f"{base}/Unsqueeze_1"),
            inputs=[onehot, gs.Constant(model.fresh_name(f"{base}/axis2"), np.array([2], dtype=np.int64))],
            outputs=[cube],
        )
        spread = gs.Variable(model.fresh_name(f"{base}/spread"), dtype=dtype)  # [batch, N, R]
        ones = gs.Constant(model.fresh_name(f"{base}/ones"), np.ones((n, r), dtype=dtype))
        graph.layer(op="Mul", name=model.fresh_name(f"{base}/Mul"), inputs=[cube, ones], outputs=[spread])
        mask = gs.Variable(model.fresh_name(f"{base}/mask"), dtype=dtype)
        shape = gs.Constant(model.fresh_name(f"{base}/shape"), np.array([0, 1, n * r], dtype=np.int64))
        graph.layer(op="Reshape", name=model.fresh_name(f"{base}/Reshape"), inputs=[spread, shape], outputs=[mask])
        return mask

    def _path(
        self,
        model: Model,
        node: gs.Node,
        module: str,
        fan_in: int,
        fan_out: int,
        slot: gs.Variable,
        mask: gs.Variable,
        dtype: type,
    ) -> LoraTarget:
        """y -> y + the masked low-rank path of x, for the linear `node` of `module`."""
        n, r = self.slots, self.max_rank
        graph = model.graph
        a_name, b_name = input_names(module)
        a = gs.Variable(a_name, dtype=dtype, shape=[n, r, fan_in])
        b = gs.Variable(b_name, dtype=dtype, shape=[n, fan_out, r])
        graph.inputs += [a, b]
        base = "/" + node.name.strip("/").rsplit("/", 1)[0] + "/lora"  # the module's scope: marks, ranks
        x, y = node.inputs[0], node.outputs[0]

        def op(
            kind: str, inputs: list[gs.Tensor], attrs: dict[str, object] | None = None, out_type: type = dtype
        ) -> gs.Variable:
            out = gs.Variable(model.fresh_name(f"{base}/{kind}_output_0"), dtype=out_type)
            graph.layer(op=kind, name=model.fresh_name(f"{base}/{kind}"), inputs=inputs, outputs=[out], attrs=attrs)
            return out

        def const(tag: str, values: list[int]) -> gs.Constant:
            return gs.Constant(model.fresh_name(f"{base}/{tag}"), np.array(values, dtype=np.int64))

        a_flat = op("Reshape", [a, const("a_shape", [n * r, fan_in])])
        a_t = op("Transpose", [a_flat], {"perm": [1, 0]})  # [in, N*R]
        b_t = op("Transpose", [b], {"perm": [0, 2, 1]})  # [N, R, out]
        b_flat = op("Reshape", [b_t, const("b_shape", [n * r, fan_out])])
        t = op("MatMul", [x, a_t])
        flat = node.op == "Gemm"  # x is [batch * seq, in]: rows regrouped by batch for the mask
        if flat:
            rows = op("Shape", [slot], out_type=np.int64)
            grouped = op("Concat", [rows, const("grouped", [-1, n * r])], {"axis": 0}, np.int64)
            t = op("Reshape", [t, grouped])
        t = op("Mul", [t, mask])
        d = op("MatMul", [t, b_flat])
        if flat:
            d = op("Reshape", [d, const("flat", [-1, fan_out])])
        y = bias_output(y) or y  # after the bias: the base layer's own output stays as the split passes know it
        if y in graph.outputs:
            raise InputError(f"--lora-slots: {module}'s output is a graph output, which cannot take a LoRA path")
        total = gs.Variable(model.fresh_name(f"{base}/Add_output_0"), dtype=y.dtype, shape=y.shape)
        consumers = list(y.outputs)
        graph.layer(op="Add", name=model.fresh_name(f"{base}/Add"), inputs=[y, d], outputs=[total])
        for consumer in consumers:
            consumer.inputs = [total if t is y else t for t in consumer.inputs]
        return LoraTarget(module, a_name, b_name, fan_in, fan_out)


def is_lora_add(node: gs.Node) -> bool:
    """The Add that puts a low-rank path's output on its layer's (the split passes step over it)."""
    return node.op == "Add" and module_of(node.name).endswith(".lora")


def bias_output(tensor: gs.Tensor | None) -> gs.Variable | None:
    """The output of the Add that puts a constant bias vector on `tensor`, if that is its only consumer."""
    if tensor is None or len(tensor.outputs) != 1 or tensor.outputs[0].op != "Add":
        return None
    add = tensor.outputs[0]
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    if not isinstance(other, gs.Constant) or len(other.shape) != 1:
        return None
    out: gs.Variable = add.outputs[0]
    return out


def _float_type(node: gs.Node) -> type:
    """The activations' float type, which the adapter inputs take."""
    dtype = node.outputs[0].dtype if node.outputs[0].dtype is not None else node.inputs[0].dtype
    return np.dtype(dtype).type if dtype is not None else np.float32


def _onnx_type(dtype: type) -> int:
    found = DType.find(np.dtype(dtype))
    if found is None:
        raise InputError(f"--lora-slots: the linear layers compute in {np.dtype(dtype)}, which llm2trt does not handle")
    return found.onnx


def _first_repeat(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""
