"""Q/DQ quantization of linear layers, placed where TensorRT's explicit quantization fuses it.

A linear layer is a MatMul whose second input is a constant 2-D weight [in, out]. Its weight becomes
`DequantizeLinear(q, scale)` (per output channel, axis 1; or INT4 blocks of `group_size` input
channels, axis 0 with `block_size`, opset 21) and, for W8A8/FP8, its input gets a static per-tensor
`QuantizeLinear -> DequantizeLinear` pair, shared by the layers that read the same tensor. Scales
are symmetric (TensorRT refuses non-zero zero points). A W8A8 weight keeps each pair of input
channels 2k, 2k+1 within |q| sums of 128 (`bounded_pairs`), so that CPUs which add such products in
int16 compute what the graph says.

The numbers come from the method (`llm2trt.passes.quant_methods`: one class each, its searches as
hooks); the graph side is the same for all. A method that smooths (SmoothQuant, AWQ) gives a per
input channel scale s: weight rows are multiplied by s and 1/s is folded into what produces the
input (the norm's scale and bias, or the previous linear's output columns, e.g. up_proj before
down_proj), so the graph gains no op. An input with nowhere to fold stays unsmoothed (a refusal
says why). The constants are computed with the NumPy reference in `llm2trt.passes.quant_math`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.log import progress
from llm2trt.core.quant import Calibration, Quantization, QuantRequest
from llm2trt.core.reports import Refusal
from llm2trt.passes.manager import GraphPass, Model, PassResult, read_values
from llm2trt.passes.ort_op_table import DOMAIN as MOE_DOMAIN
from llm2trt.passes.ort_op_table import MOE
from llm2trt.passes.pattern import module_of
from llm2trt.passes.quant_math import (
    SEARCH_ROWS,
    ActStats,
    activation_scale,
    fake_quant_values,
    fake_quant_weight,
    quantize_weight,
    weight_scale,
)
from llm2trt.passes.quant_methods import METHODS

logger = logging.getLogger(__name__)

QUANT_OPSET = 21  # DequantizeLinear's block_size and INT4 types
NORM_OPS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")
FUSING_CONSUMERS = ("MatMul", "Gemm", "Conv")  # where TensorRT fuses a DequantizeLinear
MIN_BLOCK = 16  # the smallest INT4 block a layer falls back to when --group-size does not divide it


class Calibrator(Protocol):
    """Runs a graph over calibration data and returns statistics of the named tensors."""

    def observe(self, model: Model, tensors: dict[str, int], rows: int) -> dict[str, ActStats]:
        """`tensors`: name -> channels (the last dim)."""
        ...

    @property
    def record(self) -> Calibration | None: ...


# -- the graph -------------------------------------------------------------------------------------


@dataclass
class _Linear:
    node: gs.Node
    module: str

    @property
    def weight(self) -> gs.Constant:
        w: gs.Constant = self.node.inputs[1]
        return w

    @property
    def values(self) -> np.ndarray:
        return read_values(self.weight)  # read, not kept: the graph would hold every weight

    @property
    def x(self) -> gs.Variable:
        x: gs.Variable = self.node.inputs[0]
        return x


@dataclass
class _Group:
    """Linear layers reading one input tensor (q/k/v; gate/up): they share its scale."""

    x: gs.Variable
    linears: list[_Linear]
    channels: int  # input channels (the weights' rows), read before the weights are replaced
    fold: list[tuple[gs.Node, int]] = field(default_factory=list)  # constants that take 1/s
    s: np.ndarray | None = None  # the migrated per-channel scale (None: not smoothed)
    clip: float = 1.0  # of the input's amax, for its static scale


def _attr(node: gs.Node, name: str, default: Any) -> Any:
    return node.attrs.get(name, default)


def is_linear(node: gs.Node) -> bool:
    """x @ W with W a constant float [in, out]: a MatMul, or a Gemm that neither transposes nor scales."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    if node.op == "Gemm" and (
        _attr(node, "transA", 0)
        or _attr(node, "transB", 0)
        or _attr(node, "alpha", 1.0) != 1.0
        or _attr(node, "beta", 1.0) != 1.0
    ):
        return False
    w = node.inputs[1]
    # The dtype, not the values: weights on disk stay there (FileValues).
    return len(w.shape) == 2 and DType.find(w.dtype) in (DType.FP32, DType.FP16, DType.BF16)


def transposed_constant(tensor: gs.Tensor) -> gs.Node | None:
    """The Transpose making `tensor` from a constant, if that is how it is made."""
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Transpose" and isinstance(producer.inputs[0], gs.Constant):
        return producer
    return None


def transposed_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of `tensor` when it is Transpose(constant) (a tied lm_head), read from the constant."""
    producer = transposed_constant(tensor)
    if producer is None:
        return None
    perm = producer.attrs.get("perm")
    return np.transpose(read_values(producer.inputs[0]), None if perm is None else list(perm))


def reads_tied_weight(node: gs.Node) -> bool:
    """A MatMul reading Transpose(constant): lm_head on a tied embedding, written once (export)."""
    return node.op == "MatMul" and len(node.inputs) == 2 and transposed_constant(node.inputs[1]) is not None


def _vector(tensor: gs.Tensor, channels: int) -> bool:
    return isinstance(tensor, gs.Constant) and tuple(tensor.shape) == (channels,)


def _other_readers(tensor: gs.Tensor, allowed: set[str]) -> list[gs.Node]:
    return [n for n in tensor.outputs if n.name not in allowed and n.op != "Shape"]  # Shape reads no values


Folds = list[tuple[gs.Node, int]]  # (node, input index) of constants divided by the scale


def _fold_targets(x: gs.Variable, channels: int, members: set[str]) -> tuple[Folds, str]:
    """The constants an input-channel scale can be folded into (divided by), or why there are none."""
    readers = _other_readers(x, members)
    while not readers and x.inputs and x.inputs[0].op in ("Reshape", "Flatten"):  # [b, s, C] -> [b*s, C]
        reshape = x.inputs[0]
        x = reshape.inputs[0]
        readers = _other_readers(x, {reshape.name})
    if readers:
        return [], f"its input is also read by {readers[0].op} {readers[0].name}"
    if not x.inputs:
        return [], "its input is a graph input"
    producer = x.inputs[0]
    found = _fold_into(producer, channels)
    if found:
        return found, ""
    return [], f"its input comes from {producer.op} {producer.name}: nowhere to fold a per-channel scale"


def _fold_into(producer: gs.Node, channels: int) -> Folds:
    if producer.op in NORM_OPS:  # scale and bias
        slots = [i for i in (1, 2) if i < len(producer.inputs) and not producer.inputs[i].is_empty()]
        return [(producer, i) for i in slots] if all(_vector(producer.inputs[i], channels) for i in slots) else []
    vectors = [i for i, side in enumerate(producer.inputs) if _vector(side, channels)]
    if producer.op == "Mul" and vectors:  # a decomposed norm's final scale
        return [(producer, vectors[0])]
    if producer.op == "Add" and vectors:  # a decomposed LayerNorm's bias, after its scale
        scaled = producer.inputs[1 - vectors[0]]
        before = scaled.inputs[0] if scaled.inputs and len(scaled.outputs) == 1 else None
        inner = [i for i, side in enumerate(before.inputs) if _vector(side, channels)] if before is not None else []
        return (
            [(producer, vectors[0]), (before, inner[0])] if before is not None and before.op == "Mul" and inner else []
        )
    if producer.op == "Mul":  # a gated MLP: up_proj's output columns (and bias) take the scale
        for side in producer.inputs:
            before = side.inputs[0] if side.inputs else None
            if before is not None and is_linear(before) and len(side.outputs) == 1:
                bias = [2] if len(before.inputs) > 2 and _vector(before.inputs[2], channels) else []
                return [(before, 1), *((before, i) for i in bias)]
    return []


def constant(model: Model, name: str, values: np.ndarray) -> gs.Constant:
    """A constant serialized by ONNX's own converter: onnx-graphsurgeon writes INT4 one byte per
    element, where ONNX packs two."""
    return model.constant(model.fresh_name(name), values)


def _divide(model: Model, node: gs.Node, index: int, s: np.ndarray) -> None:
    """node.inputs[index] /= s along its last axis, as a new constant (others reading it keep theirs)."""
    old: gs.Constant = node.inputs[index]
    values = np.asarray(old.values)
    node.inputs[index] = gs.Constant(model.fresh_name(f"{old.name}_smoothed"), (values / s).astype(values.dtype))


class QuantPass(GraphPass):
    """`optimize --quant`: Q/DQ on every linear layer not kept in high precision."""

    name = "quantize"
    runs_after = ("fuse_rmsnorm", "fuse_layernorm")  # folds go into fused norms' scales

    def __init__(self, request: QuantRequest, calibrator: Calibrator | None = None) -> None:
        self.request = request
        self.method = METHODS.get(request.method)
        self.method.check(request)
        self.calibrator = calibrator
        self.summary: Quantization | None = None
        self.alphas: dict[str, float] = {}  # per smoothed group (by its first layer): the strength used
        self.clips: dict[str, float] = {}  # per group: the fraction of the activation amax kept
        self.sensitivity: dict[str, float] = {}  # per group: its output's relative error, quantized
        self.blocks: dict[str, int] = {}  # layers whose block is smaller than --group-size

    def run(self, model: Model) -> PassResult:
        method, request = self.method, self.request
        refusals: list[Refusal] = []
        kept: dict[str, str] = {}
        linears = self._linears(model, kept, refusals)
        groups = self._groups(linears)
        stats = self._calibrate(model, groups)
        # The searches take minutes on a real model: say how far along they are.
        searching = method.needs_calibration
        search = progress(groups, f"{method.name}: scale search, layer groups") if searching else groups
        smoothed = sum(self._smooth(model, g, stats, refusals) for g in search)
        groups = self._keep_sensitive(groups, stats, kept)
        for group in progress(groups, f"{method.name}: quantizing, layer groups") if searching else groups:
            for linear in group.linears:
                self._quantize_weight(model, linear, group, stats)
            if method.activations is not None:
                self._quantize_input(model, group, stats, method.activations)
        quantized = [lin.module for g in groups for lin in g.linears]
        experts = self._experts(model, kept, refusals)
        quantized += experts
        counts = {f"weights_{method.weights.value}": len(quantized), "kept": len(kept), "smoothed": smoothed}
        if experts:
            counts["experts"] = len(experts)
        if method.activations is not None:
            counts[f"activations_{method.activations.value}"] = len(groups)
        record = self.calibrator.record if self.calibrator is not None else None
        self.summary = Quantization(
            method=method.name,
            weights=method.weights,
            activations=method.activations,
            granularity=method.granularity,
            group_size=request.group_size if method.blockwise else None,
            alpha=method.fixed_alpha(request),
            alphas=self.alphas,
            activation_clips=self.clips,
            sensitivity=self.sensitivity,
            block_sizes=self.blocks,
            quantized=quantized,
            kept=kept,
            smoothed=smoothed,
            scales=f"calibration on {record.text}" if record else "weights (absmax)",
            calibration=record,
        )
        return PassResult(bool(quantized), counts, refusals=refusals)

    def _linears(self, model: Model, kept: dict[str, str], refusals: list[Refusal]) -> list[_Linear]:
        keep = [re.compile(p) for p in self.request.keep]
        routers = _routers(model.graph)
        found = []
        for node in model.graph.nodes:
            tied = reads_tied_weight(node)
            if not (tied or is_linear(node)):
                continue
            module = module_of(node.name) or node.name
            router = "routes the experts (their choice stays in high precision)" if node.name in routers else ""
            reason = router or self._refuse(node, module, keep, tied)
            if reason:
                kept[module] = reason
                refusals.append(Refusal(f"quant.{self.method.name}", node.name, module, reason))
            else:
                found.append(_Linear(node, module))
        return found

    def _refuse(self, node: gs.Node, module: str, keep: list[re.Pattern[str]], tied: bool = False) -> str:
        for pattern in keep:
            if pattern.search(module):
                return f"kept in high precision (--keep {pattern.pattern})"
        if tied:
            return "reads the input embedding it is tied to (one copy of the table, kept in high precision)"
        rows = int(node.inputs[1].shape[0])
        if self.method.blockwise and not self._block(rows):
            return f"{rows} input channels are not a multiple of {MIN_BLOCK} or more"
        return ""

    @staticmethod
    def _groups(linears: list[_Linear]) -> list[_Group]:
        by_input: dict[str, _Group] = {}
        for linear in linears:
            channels = int(linear.values.shape[0])
            by_input.setdefault(linear.x.name, _Group(linear.x, [], channels)).linears.append(linear)
        return list(by_input.values())

    def _calibrate(self, model: Model, groups: list[_Group]) -> dict[str, ActStats]:
        if not self.method.needs_calibration:
            return {}
        if self.calibrator is None:
            raise ValueError(f"{self.method.name} needs a calibrator")
        tensors = {g.x.name: g.channels for g in groups}
        # Rows are sampled whenever it calibrates: the searches and the sensitivity run on them.
        return self.calibrator.observe(model, tensors, SEARCH_ROWS)

    def _smooth(self, model: Model, group: _Group, stats: dict[str, ActStats], refusals: list[Refusal]) -> int:
        """Migrate the method's per-channel scale into the group's weights and fold 1/s upstream; the
        number of layers migrated."""
        method = self.method
        if not method.smooth:
            return 0
        members = {lin.node.name for lin in group.linears}
        group.fold, reason = _fold_targets(group.x, group.channels, members)
        stat, first = stats[group.x.name], group.linears[0]
        weights = [lin.values.astype(np.float32) for lin in group.linears]
        if not group.fold:
            refusals.append(Refusal(f"quant.{method.name}.smooth", first.node.name, first.module, reason))
        found = method.input_scale(stat, weights, self.request, self._block(group.channels), foldable=bool(group.fold))
        if found.clip is not None:
            group.clip = self.clips[first.module] = found.clip
        if found.s is None or not group.fold:
            return 0
        if found.note:
            logger.debug("%s %s: %s", method.name, first.module, found.note)
        if found.alpha is not None:
            self.alphas[first.module] = found.alpha
        group.s = s = found.s
        for node, index in group.fold:
            _divide(model, node, index, s)
        for linear, w in zip(group.linears, weights, strict=True):
            linear.node.inputs[1] = gs.Constant(
                model.fresh_name(f"{linear.weight.name}_smoothed"), (w * s[:, None]).astype(linear.values.dtype)
            )
        return len(group.linears)

    def _block(self, rows: int) -> int:
        """The block size for a weight of `rows` input channels: --group-size, or where that does not
        divide them (TensorRT needs whole blocks: SmolLM2's 576 and 128), the largest power of two
        below it that does, down to MIN_BLOCK; 0 if none does."""
        size = self.request.group_size
        while size >= MIN_BLOCK and rows % size:
            size //= 2
        return size if size >= MIN_BLOCK else 0

    def _keep_sensitive(self, groups: list[_Group], stats: dict[str, ActStats], kept: dict[str, str]) -> list[_Group]:
        """Measure each group's sensitivity (the relative error of its outputs on the calibration rows,
        quantized as it will be) and leave the `keep_sensitive` worst in high precision. Their
        migration stays: it is exact in high precision."""
        act = self.method.activations
        if act is None:  # weight-only methods sample no rows unless AWQ
            return groups
        for group in groups:
            self.sensitivity[group.linears[0].module] = round(self._group_error(group, stats[group.x.name], act), 5)
        worst = sorted(groups, key=lambda g: -self.sensitivity[g.linears[0].module])[: self.request.keep_sensitive]
        for group in worst:
            error = self.sensitivity[group.linears[0].module]
            for linear in group.linears:
                kept[linear.module] = f"sensitive: {error:.3f} relative output error quantized (--keep-sensitive)"
        return [g for g in groups if g not in worst]

    def _group_error(self, group: _Group, stat: ActStats, act: DType) -> float:
        x = stat.sample.astype(np.float32)
        s = group.s if group.s is not None else np.ones(x.shape[1], np.float32)
        xq = fake_quant_values(x / s, activation_scale(stat.amax, group.s, act, group.clip), act)
        error = total = 0.0
        for linear in group.linears:
            w = linear.values.astype(np.float32)  # already migrated
            reference = (x / s) @ w
            approx = xq @ fake_quant_weight(w, self.method, self._block(group.channels))
            error += float(np.square(approx - reference).sum())
            total += float(np.square(reference).sum())
        return float(np.sqrt(error / total)) if total > 0 else 0.0

    def _quantize_weight(self, model: Model, linear: _Linear, group: _Group, stats: dict[str, ActStats]) -> None:
        method, size = self.method, self._block(group.channels)
        if method.blockwise and size != self.request.group_size:
            self.blocks[linear.module] = size
        original = linear.values
        w = original.astype(np.float32)
        clip = method.weight_clip(w, stats.get(group.x.name), group.s, size)
        scale = weight_scale(w, method, size, clip)
        q = quantize_weight(w, scale, method, size)
        base = linear.weight.name
        dtype = original.dtype
        del original
        out = gs.Variable(model.fresh_name(f"{base}_dequantized"), dtype=dtype, shape=list(w.shape))
        attrs: dict[str, Any] = {"axis": 0, "block_size": size} if method.blockwise else {"axis": 1}
        dq = gs.Node(
            "DequantizeLinear",
            name=model.fresh_name(f"{linear.node.name}_weight_dq"),
            inputs=[
                constant(model, f"{base}_quantized", q),
                gs.Constant(model.fresh_name(f"{base}_scale"), scale.astype(dtype)),
            ],
            outputs=[out],
            attrs=attrs,
        )
        model.graph.nodes.append(dq)
        model.tag(dq, f"quant.{method.name}")
        linear.node.inputs[1] = out

    def _experts(self, model: Model, kept: dict[str, str], refusals: list[Refusal]) -> list[str]:
        """The MoE nodes' expert weights ([E, out, in]: GateUp, Down), weight-only methods: each
        expert's rows quantized as a linear layer's (RTN scales from the weights: the experts see only
        the rows routed to them, which calibration does not sample), as blocks along the input axis
        (int8 per channel: one block a row). W8A8 methods leave them in high precision."""
        done = []
        why = f"{self.method.name} quantizes activations; experts take weight-only methods"
        why = "" if self.method.activations is None else why
        for node in [n for n in model.graph.nodes if n.domain == MOE_DOMAIN and n.op == MOE.name]:
            module = module_of(node.name) or node.name
            for slot in (MOE.inputs.index("GateUp"), MOE.inputs.index("Down")):
                weight = node.inputs[slot]
                rows = int(weight.shape[2]) if isinstance(weight, gs.Constant) else 0
                size = self._block(rows) if self.method.blockwise else rows
                reason = why or ("" if isinstance(weight, gs.Constant) and size else "its weights are not constant")
                if self.method.blockwise and not reason and not size:
                    reason = f"{rows} input channels are not a multiple of {MIN_BLOCK} or more"
                name = f"{module}.{MOE.inputs[slot]}"
                if reason:
                    kept[name] = reason
                    refusals.append(Refusal(f"quant.{self.method.name}", node.name, name, reason))
                    continue
                node.inputs[slot] = self._dequantized_experts(model, node, weight, size)
                done.append(name)
        return done

    def _dequantized_experts(self, model: Model, node: gs.Node, weight: gs.Constant, size: int) -> gs.Variable:
        method, values = self.method, read_values(weight)
        codes, scales = [], []
        for expert in values.astype(np.float32):  # [out, in] -> a linear layer's [in, out]
            w = expert.T
            scale = weight_scale(w, method, size)
            codes.append(quantize_weight(w, scale, method, size).T)
            scales.append((scale if method.blockwise else scale[None, :]).T)  # [out, in // size]
        base = weight.name
        out = gs.Variable(model.fresh_name(f"{base}_dequantized"), dtype=values.dtype, shape=list(values.shape))
        dq = gs.Node(
            "DequantizeLinear",
            name=model.fresh_name(f"{node.name}_{base.rsplit('.', 1)[-1]}_dq"),
            inputs=[
                constant(model, f"{base}_quantized", np.stack(codes)),
                gs.Constant(model.fresh_name(f"{base}_scale"), np.stack(scales).astype(values.dtype)),
            ],
            outputs=[out],
            attrs={"axis": 2, "block_size": size},
        )
        model.graph.nodes.append(dq)
        model.tag(dq, f"quant.{method.name}")
        return out

    def _quantize_input(self, model: Model, group: _Group, stats: dict[str, ActStats], act: DType) -> None:
        """A static per-tensor Q/DQ pair in front of the group, its scale from the (smoothed) amax."""
        scale = activation_scale(stats[group.x.name].amax, group.s, act, group.clip)
        x, first = group.x, group.linears[0].node
        dtype = DType.parse(x.dtype).numpy if x.dtype is not None else np.dtype(np.float32)
        s = gs.Constant(model.fresh_name(f"{first.name}_input_scale"), np.array(scale, dtype=dtype))
        zero = constant(model, f"{first.name}_input_zero_point", np.zeros((), act.numpy))
        q_out = gs.Variable(model.fresh_name(f"{x.name}_quantized"), dtype=act.numpy, shape=x.shape)
        dq_out = gs.Variable(model.fresh_name(f"{x.name}_dequantized"), dtype=x.dtype, shape=x.shape)
        q = gs.Node(
            "QuantizeLinear", name=model.fresh_name(f"{first.name}_input_q"), inputs=[x, s, zero], outputs=[q_out]
        )
        dq = gs.Node(
            "DequantizeLinear",
            name=model.fresh_name(f"{first.name}_input_dq"),
            inputs=[q_out, s, zero],
            outputs=[dq_out],
        )
        model.graph.nodes += [q, dq]
        for node in (q, dq):
            model.tag(node, f"quant.{self.method.name}")
        for linear in group.linears:
            linear.node.inputs[0] = dq_out


def _routers(graph: gs.Graph) -> set[str]:
    """The linear layers whose outputs choose and weigh the experts: back from the MoE nodes'
    ExpertIds and ExpertWeights through the routing ops to the first MatMul on each path."""
    found: set[str] = set()
    stack = [n.inputs[i] for n in graph.nodes if n.domain == MOE_DOMAIN and n.op == MOE.name for i in (1, 2)]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen or not tensor.inputs:
            continue
        seen.add(tensor.name)
        producer = tensor.inputs[0]
        if producer.op in ("MatMul", "Gemm"):
            found.add(producer.name)
        else:
            stack += [t for t in producer.inputs if not isinstance(t, gs.Constant)]
    return found


def unfused_qdq(proto: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes TensorRT's explicit quantization would leave as standalone scale layers: a
    QuantizeLinear not feeding only DequantizeLinear, or a DequantizeLinear not feeding only
    MatMul/Gemm/Conv. One line per node."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    found = []
    for node in proto.graph.node:
        want = {"QuantizeLinear": ("DequantizeLinear",), "DequantizeLinear": FUSING_CONSUMERS}.get(node.op_type)
        if want is None:
            continue
        consumers = readers.get(node.output[0], [])
        odd = [c.op_type for c in consumers if c.op_type not in want]
        if odd or not consumers or node.output[0] in outputs:
            found.append(f"{node.op_type} {node.name} feeds {', '.join(sorted(set(odd))) or 'a graph output'}")
    return found
