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
import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.log import progress
from llm2trt.core.quant import AutoPlan, Calibration, PlanMeasurement, Quantization, QuantRequest
from llm2trt.core.reports import Refusal
from llm2trt.passes.manager import GraphPass, Model, PassResult, read_values
from llm2trt.passes.ort_op_table import DOMAIN as MOE_DOMAIN
from llm2trt.passes.ort_op_table import MOE
from llm2trt.passes.pattern import module_of
from llm2trt.passes.quant_math import (
    SEARCH_ROWS,
    ActStats,
    activation_scale,
    dequantize_weight,
    fake_quant_values,
    fake_quant_weight,
    output_error_ratio,
    quantize_weight,
    weight_scale,
)
from llm2trt.passes.quant_methods import METHODS, QuantMethod
from llm2trt.passes.quant_methods import auto as planning

logger = logging.getLogger(__name__)

QUANT_OPSET = 21  # DequantizeLinear's block_size and INT4 types
NORM_OPS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")
FUSING_CONSUMERS = ("MatMul", "Gemm", "Conv")  # where TensorRT fuses a DequantizeLinear
MIN_BLOCK = 16  # the smallest INT4 block a layer falls back to when --group-size does not divide it
DEFAULT_BUDGET = 1.0  # percent: --quant auto without --max-ppl-increase (QuantRequest's default)
PLAN_ROUNDS = 5  # plans --quant auto measures while searching (each: one pass over the scoring windows)
PLAN_SLACK = 0.8  # a plan measured within this fraction of the budget is close enough


Codes = list[tuple[np.ndarray, np.ndarray]]  # per layer of a group: codes [in, out] and scales
Scorer = Callable[[dict[str, np.ndarray]], float]


class Calibrator(Protocol):
    """Runs a graph over calibration data and returns statistics of the named tensors."""

    def observe(self, model: Model, tensors: dict[str, int], rows: int) -> dict[str, ActStats]:
        """`tensors`: name -> channels (the last dim)."""
        ...

    def scoring(self, model: Model, replaceable: list[str]) -> AbstractContextManager[Scorer]:
        """The mean negative log-likelihood of the scoring windows, with some constants replaced."""
        ...

    @property
    def held_out(self) -> bool: ...  # scoring windows other than the calibration ones

    @property
    def score_windows(self) -> list[list[int]]: ...

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
    values = read_values(old)
    node.inputs[index] = constant(model, f"{old.name}_smoothed", (values / s).astype(values.dtype))


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
        self.error_ratios: dict[str, float] = {}  # per group, a method computing its own codes: error / rounding's
        self.plan: AutoPlan | None = None  # --quant auto's
        self.smoothed = 0

    def run(self, model: Model) -> PassResult:
        method, request = self.method, self.request
        refusals: list[Refusal] = []
        kept: dict[str, str] = {}
        linears = self._linears(model, kept, refusals)
        groups = self._groups(linears)
        stats = self._calibrate(model, groups)
        # The searches take minutes on a real model: say how far along they are.
        searching = method.needs_calibration
        smoothed = 0
        if method.mixed:
            chosen = self._plan(model, groups, stats, kept, refusals)
            smoothed = self.smoothed
        else:
            search = progress(groups, f"{method.name}: scale search, layer groups") if searching else groups
            smoothed = sum(self._smooth(model, g, stats, refusals, method) for g in search)
            groups = self._keep_sensitive(groups, stats, kept)
            chosen = {g.x.name: (method, None) for g in groups}
        groups = [g for g in groups if g.x.name in chosen]
        for group in progress(groups, f"{method.name}: quantizing, layer groups") if searching else groups:
            how, codes = chosen[group.x.name]
            codes = codes if codes is not None else self._codes(how, group, stats)
            for linear, (q, scale) in zip(group.linears, codes, strict=True):
                self._write_weight(model, linear, group, q, scale, how)
            if how.activations is not None:
                self._quantize_input(model, group, stats, how.activations)
        quantized = [lin.module for g in groups for lin in g.linears]
        experts = self._experts(model, kept, refusals)
        quantized += experts
        counts = {f"weights_{method.weights.value}": len(quantized), "kept": len(kept), "smoothed": smoothed}
        if method.mixed:
            counts = {"quantized": len(quantized), "kept": len(kept), "smoothed": smoothed}
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
            dampening=method.dampening,
            error_vs_rounding=self.error_ratios,
            plan=self.plan,
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

    def _smooth(
        self, model: Model, group: _Group, stats: dict[str, ActStats], refusals: list[Refusal], method: QuantMethod
    ) -> int:
        """Migrate the method's per-channel scale into the group's weights and fold 1/s upstream; the
        number of layers migrated."""
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
        # To the spill file, not memory: every group is migrated before any is quantized, and the
        # migrated weights held in memory were the whole model's (1.1B int4-awq peaked at 1.05x).
        for linear, w in zip(group.linears, weights, strict=True):
            dtype = DType.parse(linear.weight.dtype).numpy
            linear.node.inputs[1] = constant(model, f"{linear.weight.name}_smoothed", (w * s[:, None]).astype(dtype))
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

    def _codes(self, method: QuantMethod, group: _Group, stats: dict[str, ActStats]) -> Codes:
        """The group's weights as `method` quantizes them: its own codes (GPTQ) or rounding."""
        size = self._block(group.channels)
        stat = stats.get(group.x.name)
        weights = [lin.values.astype(np.float32) for lin in group.linears]
        own = method.quantize(weights, stat, size)
        if own is not None:
            if own.error_vs_rounding is not None:
                self.error_ratios[group.linears[0].module] = own.error_vs_rounding
            return [(np.ascontiguousarray(q), np.ascontiguousarray(scale)) for q, scale in own.layers]
        codes = []
        for w in weights:
            clip = method.weight_clip(w, stat, group.s, size)
            scale = weight_scale(w, method, size, clip)
            codes.append((quantize_weight(w, scale, method, size), scale))
        return codes

    def _write_weight(
        self, model: Model, linear: _Linear, group: _Group, q: np.ndarray, scale: np.ndarray, method: QuantMethod
    ) -> None:
        """The layer's weight becomes DequantizeLinear(q, scale) (blocks along the input axis, or per
        output channel)."""
        size = self._block(group.channels)
        if method.blockwise and size != self.request.group_size:
            self.blocks[linear.module] = size
        base, dtype = linear.weight.name, DType.parse(linear.weight.dtype).numpy
        out = gs.Variable(model.fresh_name(f"{base}_dequantized"), dtype=dtype, shape=list(q.shape))
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

    # -- --quant auto ----------------------------------------------------------------------------

    def _plan(
        self,
        model: Model,
        groups: list[_Group],
        stats: dict[str, ActStats],
        kept: dict[str, str],
        refusals: list[Refusal],
    ) -> dict[str, tuple[QuantMethod, Codes | None]]:
        """Choose each group's precision within the perplexity budget (see `quant_methods.auto`): every
        candidate's codes and output error per group, perplexity measured with everything at each
        candidate to fit the estimate, the cheapest plan the estimate allows, then measured and
        upgraded until the measurement is within budget too. Returns the chosen groups' codes."""
        calibrator = self.calibrator
        if calibrator is None:
            raise ValueError("--quant auto needs a calibrator")
        budget = self.request.max_ppl_increase or DEFAULT_BUDGET
        candidates = [METHODS.get(name) for name in planning.CANDIDATES]
        for method in (c for c in candidates if c.smooth):  # exact in high precision: every group gets it
            looking = progress(groups, f"{method.name}: scale search, layer groups")
            self.smoothed = sum(self._smooth(model, g, stats, refusals, method) for g in looking)
        options = _Options()
        for group in progress(groups, "auto: every candidate, layer groups"):
            self._options(group, stats, candidates, options)
        with calibrator.scoring(model, [lin.weight.name for g in groups for lin in g.linears]) as nll:
            search = _PlanSearch(nll, options, groups, self._block, planning.budget_nll(budget))
            choice, estimated, measured = search.run()
        chosen: dict[str, tuple[QuantMethod, Codes | None]] = {}
        for group in groups:
            c = choice[group.x.name]
            if c != planning.KEPT:
                chosen[group.x.name] = (METHODS.get(c), options.codes[group.x.name, c])
                continue
            for linear in group.linears:
                kept[linear.module] = f"kept in high precision by the plan (--max-ppl-increase {budget:g})"
        first = {g.x.name: g.linears[0].module for g in groups}
        self.plan = AutoPlan(
            budget=budget,
            candidates=list(planning.CANDIDATES),
            groups={first[g]: c for g, c in choice.items()},
            counts={c: sum(1 for v in choice.values() if v == c) for c in (*planning.CANDIDATES, planning.KEPT)},
            weight_bytes=sum(options.sizes[g][c] for g, c in choice.items()),
            weight_bytes_fp16=sum(options.sizes[g][planning.KEPT] for g in choice),
            estimated=round(planning.increase(estimated), 6),
            measured=round(planning.increase(measured), 6),
            windows=len(calibrator.score_windows),
            held_out=calibrator.held_out,
            measurements=search.measurements,
            errors={first[g]: {c: round(e, 8) for c, e in v.items()} for g, v in options.errors.items()},
        )
        return chosen

    def _options(
        self, group: _Group, stats: dict[str, ActStats], candidates: list[QuantMethod], into: _Options
    ) -> None:
        """Each candidate's codes of the group, their relative output error and their bytes."""
        weights = [lin.values.astype(np.float32) for lin in group.linears]
        key, size = group.x.name, self._block(group.channels)
        into.errors[key], into.sizes[key] = {}, {planning.KEPT: sum(2 * w.size for w in weights)}
        for method in candidates:
            codes = into.codes[key, method.name] = self._codes(method, group, stats)
            approx = [dequantize_weight(q, scale, method, size) for q, scale in codes]
            into.errors[key][method.name] = output_error_ratio(stats[key], weights, approx)
            bits = 4 if method.weights is DType.INT4 else 8
            into.sizes[key][method.name] = sum(q.size * bits // 8 + 2 * scale.size for q, scale in codes)

    def _experts(self, model: Model, kept: dict[str, str], refusals: list[Refusal]) -> list[str]:
        """The MoE nodes' expert weights ([E, out, in]: GateUp, Down), weight-only methods: each
        expert's rows quantized as a linear layer's (RTN scales from the weights: the experts see only
        the rows routed to them, which calibration does not sample), as blocks along the input axis
        (int8 per channel: one block a row). W8A8 methods leave them in high precision."""
        done = []
        why = f"{self.method.name} quantizes activations; experts take weight-only methods"
        why = "" if self.method.activations is None else why
        if self.method.mixed:
            why = "--quant auto plans the linear layers; experts stay in high precision"
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


@dataclass
class _Options:
    """--quant auto's candidates per group (by input tensor name): codes, relative error, bytes."""

    codes: dict[tuple[str, str], Codes] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # with KEPT: fp16 bytes


class _PlanSearch:
    """Fit the estimate to measured perplexity, plan, measure the plan, re-plan while over budget."""

    def __init__(
        self, nll: Scorer, options: _Options, groups: list[_Group], block: Callable[[int], int], allowed: float
    ) -> None:
        self.nll, self.options, self.groups, self.block, self.allowed = nll, options, groups, block, allowed
        self.measurements: list[PlanMeasurement] = []
        self.seen: dict[tuple[tuple[str, str], ...], float] = {}
        self.base = 0.0

    def measure(self, choice: dict[str, str], what: str) -> float:
        """The log-perplexity increase of `choice` on the scoring windows (the weights replaced by
        their dequantized values: what the DequantizeLinear computes); each choice measured once."""
        key = tuple(sorted(choice.items()))
        if key in self.seen:
            return self.seen[key]
        weights = {}
        for group in self.groups:
            c = choice[group.x.name]
            if c == planning.KEPT:
                continue
            method, size = METHODS.get(c), self.block(group.channels)
            for linear, (q, scale) in zip(group.linears, self.options.codes[group.x.name, c], strict=True):
                dtype = DType.parse(linear.weight.dtype).numpy
                weights[linear.weight.name] = dequantize_weight(q, scale, method, size).astype(dtype)
        delta = self.seen[key] = self.nll(weights) - self.base
        self.measurements.append(PlanMeasurement(what, round(self.base + delta, 8), round(planning.increase(delta), 6)))
        logger.info("--quant auto: %s: perplexity %+.3f%%", what, planning.increase(delta))
        return delta

    def run(self) -> tuple[dict[str, str], float, float]:
        """The plan, its estimated and its measured log-perplexity increase."""
        order, errors, sizes = planning.CANDIDATES, self.options.errors, self.options.sizes
        self.base = self.nll({})
        self.measurements.append(PlanMeasurement("high precision", round(self.base, 8), 0.0))
        k: dict[str, float] = {}
        best: tuple[dict[str, str], float, float] | None = None
        for c in order:
            everything = dict.fromkeys(errors, c)
            total = sum(errors[g][c] for g in errors)
            measured = self.measure(everything, f"everything {c}")
            k[c] = max(measured, 0.0) / total if total > 0 else 0.0
            if measured <= self.allowed and best is None:  # the cheapest candidate alone fits
                best = (everything, k[c] * total, measured)
        cheapest = dict.fromkeys(errors, order[0])
        # One scale on the cheapest candidate's coefficient, searched: the smallest that plans a choice
        # measured within budget (a larger one plans more precision). The other candidates' coefficients
        # stay as measured alone: INT8's error adds up as fitted, INT4's compounds (on SmolLM2 a plan of
        # 1% estimated with the everything-INT4 fit measured 8.5%). Each step moves the scale by
        # measured / estimated (at least halved or doubled), or to the geometric mean of the largest
        # scale seen over budget and the smallest seen within it. The measurements steer; the
        # estimate only ranks the groups.
        scale, over, within = 1.0, 0.0, math.inf
        for round_ in range(1, PLAN_ROUNDS + 1):
            scaled = {**k, order[0]: k[order[0]] * scale}
            choice = planning.plan(errors, sizes, scaled, self.allowed, cheapest, order)
            estimated = planning.estimate(choice, errors, scaled)
            measured = self.measure(choice, f"the plan (round {round_})")
            if measured <= self.allowed:
                if best is None or planning.weight_bytes(choice, sizes) < planning.weight_bytes(best[0], sizes):
                    best = (choice, estimated, measured)
                within = min(within, scale)
                if measured >= PLAN_SLACK * self.allowed or estimated <= 0:
                    break  # close enough to the budget, or nothing left to make cheaper
            else:
                over = max(over, scale)
            if over > 0 and within < math.inf:
                if within / over < 1.05:
                    break
                scale = math.sqrt(over * within)
            else:  # at least halved (within budget) or doubled (over): the ratio alone can stall
                ratio = measured / estimated if estimated > 0 and measured > 0 else 1.0
                scale *= min(ratio, 0.5) if measured <= self.allowed else max(ratio, 2.0)
        if best is not None:
            return best
        return self._upgrade(choice, {**k, order[0]: k[order[0]] * scale}, measured)

    def _upgrade(
        self, choice: dict[str, str], k: dict[str, float], measured: float
    ) -> tuple[dict[str, str], float, float]:
        """No searched plan fitted: upgrade the last one until its measurement does."""
        order, errors, sizes = planning.CANDIDATES, self.options.errors, self.options.sizes
        estimated = planning.estimate(choice, errors, k)
        while measured > self.allowed and not all(c == planning.KEPT for c in choice.values()):
            k = planning.refit(k, choice, errors, measured, estimated)
            upgraded = planning.plan(errors, sizes, k, self.allowed, choice, order)
            choice = upgraded if upgraded != choice else planning.force_upgrade(choice, errors, order)
            estimated = planning.estimate(choice, errors, k)
            measured = self.measure(choice, "the plan, upgraded")
        return (
            choice,
            estimated,
            min(measured, self.allowed) if all(c == planning.KEPT for c in choice.values()) else measured,
        )


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
