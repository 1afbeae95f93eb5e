"""Probe which fused ONNX ops our fusion passes should emit: each candidate against a decomposed reference.

For every candidate form (LayerNorm, RMSNorm, GELU, RoPE, Attention, in ONNX and com.microsoft spellings)
it builds a one-node "fused" model and an equivalent graph of primitive ops, then measures:

- ONNX Runtime: does the fused session create and run; max normwise relative error
  max|fused - ref| / max|ref| against the decomposed graph (run with graph optimizations off, so the
  reference really is made of primitives; fp16 references compute in fp32 and cast the result back);
- TensorRT-RTX: parse, build for one compute capability (SM89 by default), layer counts fused / decomposed.
  Parse and build run in llm2trt's build worker (`llm2trt.build.driver.run_worker`: a child process with Polygraphy's
  TensorRT loaders), because TensorRT-RTX can segfault on some graphs: a crash fills the table's cells, it does
  not end the probe. run_worker has no time limit of its own; --trt-timeout is enforced here with SIGALRM
  (run_worker stops its worker on the exception the alarm raises);
- ONNX Runtime latency (default optimizations, as users run it): median of --runs runs after warm-up,
  reported as decomposed / fused (> 1 means the fused op is faster).

Run:
    python scripts/probe_fused_ops.py                    # CPU, with TensorRT-RTX columns
    python scripts/probe_fused_ops.py --providers cuda   # GPU; TensorRT columns only if tensorrt_rtx imports
    python scripts/probe_fused_ops.py --only attn --dtypes float16
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from common import print_columns, wall_times, work_dir
from onnx import helper, numpy_helper

from llm2trt.backends.tensorrt.adapter import RTX_COMPUTE_CAPABILITIES, Backend, load_backend
from llm2trt.build.driver import WorkerFailed, run_worker
from llm2trt.build.worker import BuildRequest, BuildResult
from llm2trt.core.numerics import normwise_rel_err

EPS = 1e-5
MS_DOMAIN = "com.microsoft"
ROPE_BASE = 10000.0
MAX_POS = 256  # rows of the 2-D cos/sin caches; > seq + the per-batch position offset


@dataclass(frozen=True)
class Sizes:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# ---------------------------------------------------------------------------------------------------------------
# A tiny graph builder: each call appends one node and returns its output name.
# ---------------------------------------------------------------------------------------------------------------


class Graph:
    """Builds a static-shape ONNX model. With `compute` set (the fp32 reference of an fp16 form), float inputs
    and constants are cast to `compute` on the way in and outputs are cast back on the way out."""

    def __init__(self, opset: int, compute: type[np.floating[Any]] | None = None) -> None:
        self.opset = opset
        self.compute = compute
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.domains: set[str] = set()
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, value: np.ndarray) -> str:
        elem = helper.np_dtype_to_tensor_dtype(value.dtype)
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
        if self.compute is not None and value.dtype.kind == "f" and value.dtype != self.compute:
            return self.op("Cast", name, to=helper.np_dtype_to_tensor_dtype(np.dtype(self.compute)))
        return name

    def const(self, value: np.ndarray | float | list[int]) -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:  # Python floats: the graph's own float type
            arr = arr.astype(np.float32)
        if self.compute is not None and arr.dtype.kind == "f":
            arr = arr.astype(self.compute)
        name = self._fresh("c")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values: Iterable[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        return self.multi(op_type, *inputs, n_out=1, domain=domain, **attrs)[0]

    def multi(self, op_type: str, *inputs: str, n_out: int, domain: str = "", **attrs: Any) -> list[str]:
        outs = [self._fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._fresh(f"n_{op_type}"), **attrs))
        if domain:
            self.nodes[-1].domain = domain
            self.domains.add(domain)
        return outs

    def output(self, tensor: str, dtype: np.dtype[Any]) -> None:
        if self.compute is not None and dtype != self.compute:
            tensor = self.op("Cast", tensor, to=helper.np_dtype_to_tensor_dtype(dtype))
        self.outputs.append(helper.make_tensor_value_info(tensor, helper.np_dtype_to_tensor_dtype(dtype), None))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "probe", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="probe_fused_ops")
        # onnx 1.23 stamps its newest IR version; ONNX Runtime 1.31 and TensorRT read older ones only.
        model.ir_version = helper.find_min_ir_version_for(opsets[:1], ignore_unknown=True)
        return model

    # Primitive helpers shared by the references.
    def reduce_mean(self, x: str) -> str:
        if self.opset >= 18:  # axes became an input at opset 18
            return self.op("ReduceMean", x, self.ints([-1]), keepdims=1)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.ints([axis]))

    def reshape(self, x: str, shape: Iterable[int]) -> str:
        return self.op("Reshape", x, self.ints(shape))

    def last_slice(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.ints([start]), self.ints([end]), self.ints([-1]))


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    fused: onnx.ModelProto
    ref: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _ref_graph(opset: int, dt: np.dtype[Any]) -> Graph:
    return Graph(opset, np.float32 if dt == np.float16 else None)


def _mask_min(dt: np.dtype[Any]) -> float:
    # Hugging Face fills masked scores with finfo(dtype).min, not -inf: do what real graphs carry.
    return float(np.finfo(dt).min)


# ---------------------------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------------------------


def layernorm_cases(sz: Sizes, dt: np.dtype[Any]) -> list[Case]:
    rng = _rng()
    x = rng.standard_normal((sz.batch, sz.seq, sz.hidden)).astype(dt)
    scale = (1 + 0.1 * rng.standard_normal(sz.hidden)).astype(dt)
    bias = (0.1 * rng.standard_normal(sz.hidden)).astype(dt)
    cases = []
    for with_bias in (True, False):
        f = Graph(17)
        args = [f.input("X", x), f.const(scale)] + ([f.const(bias)] if with_bias else [])
        f.output(f.op("LayerNormalization", *args, axis=-1, epsilon=EPS), dt)

        r = _ref_graph(17, dt)
        xi = r.input("X", x)
        centered = r.op("Sub", xi, r.reduce_mean(xi))
        var = r.reduce_mean(r.op("Pow", centered, r.const(2.0)))
        y = r.op("Mul", r.op("Div", centered, r.op("Sqrt", r.op("Add", var, r.const(EPS)))), r.const(scale))
        if with_bias:
            y = r.op("Add", y, r.const(bias))
        r.output(y, dt)
        name = "layernorm" + ("" if with_bias else "_nobias")
        cases.append(Case(name, dt.name, f.model(), r.model(), {"X": x}))
    return cases


def rmsnorm_cases(sz: Sizes, dt: np.dtype[Any]) -> list[Case]:
    rng = _rng()
    x = rng.standard_normal((sz.batch, sz.seq, sz.hidden)).astype(dt)
    scale = (1 + 0.1 * rng.standard_normal(sz.hidden)).astype(dt)

    r = _ref_graph(23, dt)
    xi = r.input("X", x)
    ms = r.reduce_mean(r.op("Pow", xi, r.const(2.0)))
    inv = r.op("Reciprocal", r.op("Sqrt", r.op("Add", ms, r.const(EPS))))
    r.output(r.op("Mul", r.op("Mul", xi, inv), r.const(scale)), dt)
    ref = r.model()

    # (label, op_type, domain, extra attributes). ONNX Runtime registers SimplifiedLayerNormalization in the
    # ONNX domain (""), not com.microsoft: probe both spellings.
    forms: list[tuple[str, str, str, dict[str, Any]]] = [
        ("rmsnorm_onnx23", "RMSNormalization", "", {"stash_type": 1}),
        ("simplified_ln", "SimplifiedLayerNormalization", "", {}),
        ("simplified_ln_ms", "SimplifiedLayerNormalization", MS_DOMAIN, {}),
    ]
    cases = []
    for label, op_type, domain, extra in forms:
        f = Graph(23)
        y = f.op(op_type, f.input("X", x), f.const(scale), domain=domain, axis=-1, epsilon=EPS, **extra)
        f.output(y, dt)
        cases.append(Case(label, dt.name, f.model(), ref, {"X": x}))
    return cases


def gelu_cases(sz: Sizes, dt: np.dtype[Any]) -> list[Case]:
    x = (2 * _rng().standard_normal((sz.batch, sz.seq, 4 * sz.hidden))).astype(dt)

    def ref(tanh: bool) -> onnx.ModelProto:
        r = _ref_graph(20, dt)
        xi = r.input("X", x)
        if tanh:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            inner = r.op("Add", xi, r.op("Mul", r.op("Pow", xi, r.const(3.0)), r.const(0.044715)))
            t = r.op("Tanh", r.op("Mul", inner, r.const(math.sqrt(2 / math.pi))))
        else:  # 0.5 x (1 + erf(x / sqrt 2))
            t = r.op("Erf", r.op("Mul", xi, r.const(1 / math.sqrt(2))))
        r.output(r.op("Mul", r.op("Mul", xi, r.op("Add", t, r.const(1.0))), r.const(0.5)), dt)
        return r.model()

    forms: list[tuple[str, str, str, dict[str, Any], bool]] = [
        ("gelu_onnx20_none", "Gelu", "", {"approximate": "none"}, False),
        ("gelu_onnx20_tanh", "Gelu", "", {"approximate": "tanh"}, True),
        ("gelu_ms", "Gelu", MS_DOMAIN, {}, False),
        ("fastgelu_ms", "FastGelu", MS_DOMAIN, {}, True),
    ]
    cases = []
    for label, op_type, domain, attrs, tanh in forms:
        f = Graph(20)
        f.output(f.op(op_type, f.input("X", x), domain=domain, **attrs), dt)
        cases.append(Case(label, dt.name, f.model(), ref(tanh), {"X": x}))
    return cases


def _rope_angles(positions: np.ndarray, head_dim: int) -> np.ndarray:
    inv_freq = 1.0 / ROPE_BASE ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return positions[..., None].astype(np.float64) * inv_freq  # (..., head_dim / 2)


def _ref_rope(g: Graph, x: str, cos: str, sin: str, half: int, head_axis: int) -> str:
    """Hugging Face Llama: x * cos + rotate_half(x) * sin, cos/sin duplicated from D/2 to D.
    `cos`/`sin` are (B, S, D/2); `head_axis` is where x keeps its heads (1 for BHSD, 2 for BSHD)."""
    cos_full = g.unsqueeze(g.op("Concat", cos, cos, axis=-1), head_axis)
    sin_full = g.unsqueeze(g.op("Concat", sin, sin, axis=-1), head_axis)
    x1, x2 = g.last_slice(x, 0, half), g.last_slice(x, half, 2 * half)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos_full), g.op("Mul", rotated, sin_full))


@dataclass(frozen=True)
class RopeInputs:
    """What every RotaryEmbedding form shares: x in both layouts, positions, cos/sin per position and as caches."""

    sz: Sizes
    dt: np.dtype[Any]
    pos: np.ndarray  # (B, S) position ids
    cos3: np.ndarray  # (B, S, D/2)
    sin3: np.ndarray
    cos_cache: np.ndarray  # (MAX_POS, D/2)
    sin_cache: np.ndarray
    x4: np.ndarray  # (B, H, S, D)
    x3: np.ndarray  # (B, S, H*D)

    @classmethod
    def make(cls, sz: Sizes, dt: np.dtype[Any]) -> RopeInputs:
        rng = _rng()
        b, s, h, d = sz.batch, sz.seq, sz.heads, sz.head_dim
        # Different positions per batch row, so a layout that ignores the batch axis of cos/sin shows up as error.
        pos = (np.arange(s)[None, :] + 3 * np.arange(b)[:, None]).astype(np.int64)
        ang, ang_cache = _rope_angles(pos, d), _rope_angles(np.arange(MAX_POS), d)
        x4 = rng.standard_normal((b, h, s, d)).astype(dt)
        x3 = rng.standard_normal((b, s, h * d)).astype(dt)
        cos3, sin3 = np.cos(ang).astype(dt), np.sin(ang).astype(dt)
        cos_cache, sin_cache = np.cos(ang_cache).astype(dt), np.sin(ang_cache).astype(dt)
        return cls(sz, dt, pos, cos3, sin3, cos_cache, sin_cache, x4, x3)


def _rope_ref(ri: RopeInputs, x: np.ndarray, cos: np.ndarray | None, sin: np.ndarray | None) -> onnx.ModelProto:
    """cos/sin given: graph inputs (B or 1, S, D/2); None: Gather from the caches by position_ids."""
    b, s, h, d = ri.sz.batch, ri.sz.seq, ri.sz.heads, ri.sz.head_dim
    r = _ref_graph(23, ri.dt)
    xi = r.input("X", x)
    if cos is not None and sin is not None:
        ci, si = r.input("cos", cos), r.input("sin", sin)
    else:
        pi = r.input("position_ids", ri.pos)
        ci = r.op("Gather", r.const(ri.cos_cache), pi, axis=0)
        si = r.op("Gather", r.const(ri.sin_cache), pi, axis=0)
    if x.ndim == 4:
        y = _ref_rope(r, xi, ci, si, d // 2, head_axis=1)
    else:
        y = r.reshape(_ref_rope(r, r.reshape(xi, [b, s, h, d]), ci, si, d // 2, head_axis=2), [b, s, h * d])
    r.output(y, ri.dt)
    return r.model()


def _rope_cos_sin_case(
    ri: RopeInputs, label: str, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, attrs: dict[str, Any]
) -> Case:
    """ONNX RotaryEmbedding with cos/sin as graph inputs."""
    f = Graph(23)
    f.output(f.op("RotaryEmbedding", f.input("X", x), f.input("cos", cos), f.input("sin", sin), **attrs), ri.dt)
    feeds = {"X": x, "cos": cos, "sin": sin}
    return Case(label, ri.dt.name, f.model(), _rope_ref(ri, x, cos, sin), feeds)


def _rope_cache_case(ri: RopeInputs) -> Case:
    """(b) 2-D caches as initializers, position_ids (B, S) as an input: ONNX order is X, cos, sin, position_ids."""
    f = Graph(23)
    xi, pi = f.input("X", ri.x4), f.input("position_ids", ri.pos)
    f.output(f.op("RotaryEmbedding", xi, f.const(ri.cos_cache), f.const(ri.sin_cache), pi), ri.dt)
    feeds = {"X": ri.x4, "position_ids": ri.pos}
    return Case("rope_4d_cache_posids", ri.dt.name, f.model(), _rope_ref(ri, ri.x4, None, None), feeds)


def _rope_ms_cases(ri: RopeInputs) -> list[Case]:
    """com.microsoft.RotaryEmbedding: input, position_ids, cos_cache, sin_cache (2-D caches only). ONNX Runtime
    infers the heads of a 3-D input from the cache width; TensorRT-RTX's importer wants num_heads: give it."""
    cases = []
    for label, x, attrs in (("rope_ms_4d", ri.x4, {}), ("rope_ms_3d", ri.x3, {"num_heads": ri.sz.heads})):
        f = Graph(23)
        xi, pi = f.input("X", x), f.input("position_ids", ri.pos)
        cc, sc = f.const(ri.cos_cache), f.const(ri.sin_cache)
        f.output(f.op("RotaryEmbedding", xi, pi, cc, sc, domain=MS_DOMAIN, **attrs), ri.dt)
        feeds = {"X": x, "position_ids": ri.pos}
        cases.append(Case(label, ri.dt.name, f.model(), _rope_ref(ri, x, None, None), feeds))
    return cases


def rope_cases(sz: Sizes, dt: np.dtype[Any]) -> list[Case]:
    ri = RopeInputs.make(sz, dt)
    cos3_b1, sin3_b1 = ri.cos3[:1], ri.sin3[:1]  # what torch's dynamo exporter emits: batch 1, broadcast
    return [
        _rope_cos_sin_case(ri, "rope_4d_cos3d", ri.x4, ri.cos3, ri.sin3, {}),  # (a)
        _rope_cos_sin_case(ri, "rope_4d_cos3d_b1", ri.x4, cos3_b1, sin3_b1, {}),  # dynamo's batch-1 cos/sin
        _rope_cos_sin_case(ri, "rope_3d_heads", ri.x3, ri.cos3, ri.sin3, {"num_heads": sz.heads}),  # (c)
        _rope_cache_case(ri),  # (b)
        *_rope_ms_cases(ri),
    ]


def _ref_attention(
    g: Graph, q: str, k: str, v: str, sz: Sizes, hq: int, hkv: int, skv: int, scale: float, mask: str | None
) -> str:
    """softmax(Q K^T * scale + mask) V on (B, H, S, D); K/V heads repeated for GQA as Hugging Face's repeat_kv."""
    if hkv != hq:
        rep, b, d = hq // hkv, sz.batch, sz.head_dim
        k, v = (
            g.reshape(g.op("Expand", g.unsqueeze(t, 2), g.ints([b, hkv, rep, skv, d])), [b, hq, skv, d]) for t in (k, v)
        )
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(scale))
    if mask is not None:
        scores = g.op("Add", scores, mask)
    return g.op("MatMul", g.op("Softmax", scores, axis=-1), v)


def _split_heads(g: Graph, name: str, value: np.ndarray, heads: int, head_dim: int) -> str:
    """Graph input (B, S, H*D) -> (B, H, S, D)."""
    b, s, _ = value.shape
    return g.op("Transpose", g.reshape(g.input(name, value), [b, s, heads, head_dim]), perm=[0, 2, 1, 3])


@dataclass(frozen=True)
class AttnInputs:
    """What every attention form shares: sizes, dtype, masks, and one random stream drawn in case order."""

    sz: Sizes
    dt: np.dtype[Any]
    rng: np.random.Generator
    keep: np.ndarray  # (B, 1, S, S) bool, True attends
    causal: np.ndarray  # (1, 1, S, S) bool
    pad_mask: np.ndarray  # additive, from `keep`
    causal_pad_mask: np.ndarray  # additive, from `keep & causal`

    @classmethod
    def make(cls, sz: Sizes, dt: np.dtype[Any]) -> AttnInputs:
        b, s, minval = sz.batch, sz.seq, _mask_min(dt)
        # Padding: every other batch row has its last 16 keys padded (never a whole row, so no all-masked query).
        keep = np.ones((b, 1, s, s), dtype=bool)
        keep[::2, :, :, s - 16 :] = False
        causal = np.tril(np.ones((s, s), dtype=bool))[None, None]
        pad_mask = np.where(keep, 0.0, minval).astype(dt)
        causal_pad_mask = np.where(keep & causal, 0.0, minval).astype(dt)
        return cls(sz, dt, _rng(), keep, causal, pad_mask, causal_pad_mask)

    @property
    def scale(self) -> float:
        """The default softmax scale, 1 / sqrt(head_dim)."""
        return 1 / math.sqrt(self.sz.head_dim)

    def randn(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(self.dt)


@dataclass(frozen=True)
class Attn4d:
    """A 4-D ONNX Attention form: Q (B, Hq, Sq, D), K/V (B, Hkv, Sq, D). With `past` > 0 (a decode chunk of 4
    queries), the cache enters as Attention's past_key/past_value (present outputs from the op) or, with
    `past_as_concat`, through Concat nodes in front of a one-output Attention."""

    label: str
    kv_heads: int
    attrs: dict[str, Any]
    mask: np.ndarray | None = None
    past: int = 0
    past_as_concat: bool = False

    def q_len(self, sz: Sizes) -> int:
        return 4 if self.past else sz.seq

    @property
    def op_past(self) -> bool:
        """The cache goes through the op's own past inputs and comes back as its present outputs."""
        return bool(self.past) and not self.past_as_concat


def _attn4d_forms(a: AttnInputs) -> list[Attn4d]:
    s, hq, hkv = a.sz.seq, a.sz.heads, a.sz.kv_heads
    bottom_right = np.arange(s)[None, :] <= np.arange(4)[:, None] + (s - 4)
    decode_mask = np.broadcast_to(np.where(bottom_right, 0.0, _mask_min(a.dt)), (a.sz.batch, 1, 4, s)).astype(a.dt)
    return [
        Attn4d("attn_mha_floatmask", hq, {}, a.pad_mask),  # (a)
        Attn4d("attn_mha_boolmask", hq, {}, a.keep),
        Attn4d("attn_gqa_causal", hkv, {"is_causal": 1}),  # (b)
        Attn4d("attn_gqa_causal_scale", hkv, {"is_causal": 1, "scale": a.scale}),  # (b) + explicit default scale
        Attn4d("attn_gqa_floatmask", hkv, {}, a.causal_pad_mask),  # (c)
        Attn4d("attn_mha_nomask", hq, {}),  # (d)
        Attn4d("attn_mha_scale", hq, {"scale": 0.1}),  # (e) a non-default scale, so ignoring it shows as error
        # KV cache, 4 new queries after s - 4 cached keys. Through the op's past inputs, is_causal aligns
        # bottom-right. With the cache concatenated outside, the op sees no past and is_causal aligns top-left (the
        # spec counts past_key only): the reference keeps Hugging Face's bottom-right mask, so that form shows as
        # error on purpose.
        Attn4d("attn_gqa_causal_past", hkv, {"is_causal": 1}, past=s - 4),
        Attn4d("attn_gqa_causal_concat", hkv, {"is_causal": 1}, past=s - 4, past_as_concat=True),
        Attn4d("attn_gqa_concat_mask", hkv, {"scale": a.scale}, decode_mask, past=s - 4, past_as_concat=True),
    ]


def _attn4d_feeds(a: AttnInputs, form: Attn4d) -> dict[str, np.ndarray]:
    b, hq, hkv, d, q_len = a.sz.batch, a.sz.heads, form.kv_heads, a.sz.head_dim, form.q_len(a.sz)
    feeds = {"Q": a.randn(b, hq, q_len, d), "K": a.randn(b, hkv, q_len, d), "V": a.randn(b, hkv, q_len, d)}
    if form.mask is not None:
        feeds["attn_mask"] = form.mask
    if form.past:
        feeds["past_key"], feeds["past_value"] = a.randn(b, hkv, form.past, d), a.randn(b, hkv, form.past, d)
    return feeds


def _attn4d_fused(form: Attn4d, feeds: dict[str, np.ndarray], dt: np.dtype[Any]) -> onnx.ModelProto:
    f = Graph(23)
    q, k, v = (f.input(n, feeds[n]) for n in ("Q", "K", "V"))
    presents: list[str] = []
    if form.past and form.past_as_concat:
        k = f.op("Concat", f.input("past_key", feeds["past_key"]), k, axis=2)
        v = f.op("Concat", f.input("past_value", feeds["past_value"]), v, axis=2)
        presents = [k, v]
    args = [q, k, v, f.input("attn_mask", form.mask) if form.mask is not None else ""]
    if form.op_past:
        args += [f.input("past_key", feeds["past_key"]), f.input("past_value", feeds["past_value"])]
    while args[-1] == "":
        args.pop()
    outs = f.multi("Attention", *args, n_out=3 if form.op_past else 1, **form.attrs)
    for o in outs + presents:
        f.output(o, dt)
    return f.model()


def _attn4d_ref_mask(r: Graph, form: Attn4d, q_len: int) -> str | None:
    """The reference's additive mask: the form's own (boolean made additive), or the causal one it implies."""
    ref_mask: str | None = None
    if form.mask is not None:
        ref_mask = r.input("attn_mask", form.mask)
        if form.mask.dtype == np.bool_:  # boolean: True attends; make it additive
            ref_mask = r.op("Where", ref_mask, r.const(0.0), r.const(float(np.finfo(np.float32).min)))
    if form.attrs.get("is_causal"):  # bottom-right aligned: query i sees key j iff j <= i + past
        allowed = np.arange(form.past + q_len)[None, :] <= np.arange(q_len)[:, None] + form.past
        ref_mask = r.const(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
    return ref_mask


def _attn4d_ref(a: AttnInputs, form: Attn4d, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    r = _ref_graph(23, a.dt)
    q, k, v = (r.input(n, feeds[n]) for n in ("Q", "K", "V"))
    if form.past:
        k = r.op("Concat", r.input("past_key", feeds["past_key"]), k, axis=2)
        v = r.op("Concat", r.input("past_value", feeds["past_value"]), v, axis=2)
    q_len = form.q_len(a.sz)
    mask = _attn4d_ref_mask(r, form, q_len)
    scale = form.attrs.get("scale", a.scale)
    y = _ref_attention(r, q, k, v, a.sz, a.sz.heads, form.kv_heads, form.past + q_len, scale, mask)
    for o in [y, k, v] if form.past else [y]:
        r.output(o, a.dt)
    return r.model()


def attention_4d_cases(a: AttnInputs) -> list[Case]:
    """ONNX Attention on 4-D (B, H, S, D) inputs: masks, GQA, causal, scale, KV cache."""
    cases = []
    for form in _attn4d_forms(a):
        feeds = _attn4d_feeds(a, form)
        cases.append(Case(form.label, a.dt.name, _attn4d_fused(form, feeds, a.dt), _attn4d_ref(a, form, feeds), feeds))
    return cases


def _attn3d_feeds(a: AttnInputs, kv_heads: int) -> dict[str, np.ndarray]:
    b, s, d = a.sz.batch, a.sz.seq, a.sz.head_dim
    return {"Q": a.randn(b, s, a.sz.heads * d), "K": a.randn(b, s, kv_heads * d), "V": a.randn(b, s, kv_heads * d)}


def _attn3d_ref(
    a: AttnInputs, feeds: dict[str, np.ndarray], kv_heads: int, causal_mask: bool, mask: str | None
) -> onnx.ModelProto:
    """3-D (B, S, H*D) reference: split heads, attend, merge heads."""
    b, s, d, hq = a.sz.batch, a.sz.seq, a.sz.head_dim, a.sz.heads
    r = _ref_graph(23, a.dt)
    q, k, v = (_split_heads(r, n, feeds[n], h, d) for n, h in (("Q", hq), ("K", kv_heads), ("V", kv_heads)))
    mask_in = r.input(mask, feeds[mask]) if mask else None
    if causal_mask:
        mask_in = r.const(np.where(a.causal[0, 0], 0.0, float(np.finfo(np.float32).min)).astype(np.float32))
    y = _ref_attention(r, q, k, v, a.sz, hq, kv_heads, s, a.scale, mask_in)
    r.output(r.reshape(r.op("Transpose", y, perm=[0, 2, 1, 3]), [b, s, hq * d]), a.dt)
    return r.model()


def attention_3d_cases(a: AttnInputs) -> list[Case]:
    """ONNX Attention on 3-D (B, S, H*D) inputs, the heads given as attributes."""
    hq, hkv = a.sz.heads, a.sz.kv_heads
    cases = []
    for label, kv_heads, causal_flag in (("attn_3d_mha", hq, 0), ("attn_3d_gqa_causal", hkv, 1)):
        feeds = _attn3d_feeds(a, kv_heads)
        f = Graph(23)
        qkv = [f.input(n, x) for n, x in feeds.items()]
        attrs: dict[str, Any] = {"q_num_heads": hq, "kv_num_heads": kv_heads, "is_causal": causal_flag}
        f.output(f.op("Attention", *qkv, **attrs), a.dt)
        ref = _attn3d_ref(a, feeds, kv_heads, bool(causal_flag), None)
        cases.append(Case(label, a.dt.name, f.model(), ref, feeds))
    return cases


def mha_ms_cases(a: AttnInputs) -> list[Case]:
    """com.microsoft.MultiHeadAttention: 3-D q, k, v; inputs 3/4 (bias, key_padding_mask) empty, 5 =
    attention_bias. "selfqkv" passes one tensor as q, k and v: the smallest form of a graph TensorRT-RTX
    has crashed on, kept apart so a crash names its cause."""
    hq = a.sz.heads
    cases = []
    for label, with_bias, self_qkv in (
        ("mha_ms", False, False),
        ("mha_ms_bias", True, False),
        ("mha_ms_selfqkv", False, True),
    ):
        feeds = _attn3d_feeds(a, hq)
        if self_qkv:
            feeds["K"] = feeds["V"] = feeds["Q"]
        if with_bias:
            feeds["attn_mask"] = a.pad_mask
        f = Graph(23)
        args = [f.input("Q", feeds["Q"])] * 3 if self_qkv else [f.input(n, feeds[n]) for n in ("Q", "K", "V")]
        if with_bias:
            args += ["", "", f.input("attn_mask", a.pad_mask)]
        f.output(f.op("MultiHeadAttention", *args, domain=MS_DOMAIN, num_heads=hq), a.dt)
        ref = _attn3d_ref(a, feeds, hq, False, "attn_mask" if with_bias else None)
        cases.append(Case(label, a.dt.name, f.model(), ref, feeds))
    return cases


def _gqa_ms_feeds(a: AttnInputs, past: int) -> dict[str, np.ndarray]:
    b, d, hq, hkv = a.sz.batch, a.sz.head_dim, a.sz.heads, a.sz.kv_heads
    q_len = 1 if past else a.sz.seq
    feeds = {"Q": a.randn(b, q_len, hq * d), "K": a.randn(b, q_len, hkv * d), "V": a.randn(b, q_len, hkv * d)}
    feeds["past_key"], feeds["past_value"] = a.randn(b, hkv, past, d), a.randn(b, hkv, past, d)
    feeds["seqlens_k"] = np.full((b,), past + q_len - 1, dtype=np.int32)
    feeds["total_sequence_length"] = np.array([past + q_len], dtype=np.int32)
    return feeds


def _gqa_ms_fused(a: AttnInputs, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    f = Graph(23)
    args = [f.input(n, x) for n, x in feeds.items()]
    attrs = {"num_heads": a.sz.heads, "kv_num_heads": a.sz.kv_heads, "scale": a.scale}
    for o in f.multi("GroupQueryAttention", *args, n_out=3, domain=MS_DOMAIN, **attrs):
        f.output(o, a.dt)
    return f.model()


def _gqa_ms_ref(a: AttnInputs, feeds: dict[str, np.ndarray], past: int) -> onnx.ModelProto:
    """Causal attention over past + new keys; outputs the merged heads and the present key/value."""
    b, d, hq, hkv = a.sz.batch, a.sz.head_dim, a.sz.heads, a.sz.kv_heads
    q_len = feeds["Q"].shape[1]
    r = _ref_graph(23, a.dt)
    q, k, v = (_split_heads(r, n, feeds[n], heads, d) for n, heads in (("Q", hq), ("K", hkv), ("V", hkv)))
    if past:
        k = r.op("Concat", r.input("past_key", feeds["past_key"]), k, axis=2)
        v = r.op("Concat", r.input("past_value", feeds["past_value"]), v, axis=2)
    allowed = np.arange(past + q_len)[None, :] <= np.arange(q_len)[:, None] + past
    mask_c = r.const(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
    y = _ref_attention(r, q, k, v, a.sz, hq, hkv, past + q_len, a.scale, mask_c)
    r.output(r.reshape(r.op("Transpose", y, perm=[0, 2, 1, 3]), [b, q_len, hq * d]), a.dt)
    r.output(k, a.dt)
    r.output(v, a.dt)
    return r.model()


def gqa_ms_cases(a: AttnInputs) -> list[Case]:
    """com.microsoft.GroupQueryAttention: always causal; seqlens_k = total - 1 per row. TensorRT-RTX wants past_key
    and a non-zero `scale`: give both (an empty past for the prompt form). ONNX Runtime's CPU kernel takes several
    new tokens on a past only at batch 1: the past form is one token."""
    cases = []
    for label, past in (("gqa_ms_prompt", 0), ("gqa_ms_past", a.sz.seq - 1)):
        feeds = _gqa_ms_feeds(a, past)
        cases.append(Case(label, a.dt.name, _gqa_ms_fused(a, feeds), _gqa_ms_ref(a, feeds, past), feeds))
    return cases


def attention_cases(sz: Sizes, dt: np.dtype[Any]) -> list[Case]:
    """Every attention family, drawing from one random stream in this order."""
    a = AttnInputs.make(sz, dt)
    return [*attention_4d_cases(a), *attention_3d_cases(a), *mha_ms_cases(a), *gqa_ms_cases(a)]


FAMILIES: dict[str, Callable[[Sizes, np.dtype[Any]], list[Case]]] = {
    "layernorm": layernorm_cases,
    "rmsnorm": rmsnorm_cases,
    "gelu": gelu_cases,
    "rope": rope_cases,
    "attention": attention_cases,
}


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OrtResult:
    status: str = "-"
    error: float | None = None
    ms_fused: float | None = None
    ms_ref: float | None = None
    ref_unoptimized: bool = False
    notes: list[str] = field(default_factory=list)


def _short(exc: BaseException | str, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    # TensorRT and ONNX Runtime wrap the useful sentence in location prefixes: keep the sentence.
    for marker in ("failed. ", "Status Message: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _session(model: onnx.ModelProto, providers: list[str], optimize: bool, strict: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:  # the reference must stay made of primitives
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if strict:  # fail instead of silently running the fused node on the CPU
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # ONNX Runtime refuses that option next to an explicit CPU provider.
        providers = [p for p in providers if p != "CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def _feeds_for(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}  # ORT rejects feeds a graph does not declare
    return {n: a for n, a in feeds.items() if n in names}


def _bind(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str) -> Callable[[], Any]:
    """One run of the session. IO binding with inputs already on the device: GPU numbers measure kernels, not copies."""
    binding = sess.io_binding()
    for name, arr in _feeds_for(sess, feeds).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)
    run = functools.partial(sess.run_with_iobinding, binding)
    try:
        run()
        run()  # the second run reuses the output buffers the first one allocated
    except Exception:  # seen: GroupQueryAttention's inferred present shape assumes a shared KV buffer
        return functools.partial(sess.run, None, _feeds_for(sess, feeds))
    return run


def _time_pair(
    fused: ort.InferenceSession, ref: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str, runs: int
) -> tuple[float, float]:
    """Median ms of fused and ref, runs interleaved so machine noise hits both alike; tiny ops get more runs."""
    runners = [_bind(fused, feeds, device), _bind(ref, feeds, device)]
    per_pair = sum(wall_times(run, 1, warmup=3)[0] for run in runners)
    n = max(runs, min(1000, int(0.3 / max(per_pair, 1e-6))))
    times: list[list[float]] = [[], []]
    for _ in range(n):
        for i, run in enumerate(runners):
            times[i] += wall_times(run, 1)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def _normwise(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(normwise_rel_err(a, e) for a, e in zip(got, want, strict=True))


def _failed(res: OrtResult, status: str, note: str) -> OrtResult:
    res.status = status
    res.notes.append(note)
    return res


def probe_ort(case: Case, providers: list[str], device: str, runs: int) -> OrtResult:
    res = OrtResult()
    gpu = device != "cpu"
    try:
        ref_plain = _session(case.ref, providers, optimize=False, strict=False)
        want = ref_plain.run(None, _feeds_for(ref_plain, case.feeds))
    except Exception as exc:
        return _failed(res, "ref failed", f"ORT reference: {_short(exc)}")
    try:
        fused = _session(case.fused, providers, optimize=True, strict=gpu)
        res.status = "ok"
    except Exception as exc:
        if not gpu:
            return _failed(res, "refused", f"ORT session: {_short(exc)}")
        try:
            fused = _session(case.fused, providers, optimize=True, strict=False)
        except Exception as exc2:
            return _failed(res, "refused", f"ORT session: {_short(exc2)}")
        res.status = "ok (CPU fallback)"
        res.notes.append(f"ORT: not on the GPU provider: {_short(exc, 160)}")
    try:
        got = fused.run(None, _feeds_for(fused, case.feeds))
    except Exception as exc:
        return _failed(res, "run failed", f"ORT run: {_short(exc)}")
    res.error = _normwise(got, want)
    if not all(np.all(np.isfinite(g.astype(np.float64))) for g in got):
        res.notes.append("ORT: fused output has NaN/Inf")
    try:
        ref = _session(case.ref, providers, optimize=True, strict=False)
    except Exception as exc:  # seen: ORT's LayerNormFusion mistyping an fp16 graph that computes in fp32
        res.notes.append(
            f"ORT default optimizations refused the decomposed graph ({_short(exc, 200)}); ref timed unoptimized (*)"
        )
        res.ref_unoptimized = True
        ref = ref_plain
    try:
        res.ms_fused, res.ms_ref = _time_pair(fused, ref, case.feeds, device, runs)
    except Exception as exc:
        res.notes.append(f"ORT timing: {_short(exc)}")
    return res


# ---------------------------------------------------------------------------------------------------------------
# TensorRT-RTX, in llm2trt's build worker (a child process)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrtResult:
    parse: str = "-"
    build: str = "-"
    layers_fused: int | None = None
    layers_ref: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrtFailure:
    """A WorkerFailed of run_worker, read back into the table's terms."""

    stage: str  # parse | build | plugins | worker
    status: str  # fail | crash (SIGSEGV) | error
    detail: str

    @property
    def note(self) -> str:
        if self.status == "fail":
            return f"TRT {self.stage}: {_short(self.detail)}"
        return f"TRT {self.status} during {self.stage}; last message: {_short(self.detail) or 'none'}"


# Where the ONNX parser found the error, in front of what the error is: the node is the probe's only one.
_PARSER_WHERE = re.compile(r"^In node \d+ with name: .*? and operator: \S+ \(\w+\): \w+: ")


def trt_failure(exc: WorkerFailed) -> TrtFailure:
    """run_worker's failure in the table's terms: the phase, how it failed, TensorRT's last word."""
    if exc.signal is not None:
        return TrtFailure(exc.phase, f"crash ({exc.signal})", exc.detail)
    if not exc.reported:  # the worker exited without writing a result
        return TrtFailure(exc.phase, "error", exc.detail)
    return TrtFailure(exc.phase, "fail", _PARSER_WHERE.sub("", exc.detail))


class TrtTimeout(Exception):
    """--trt-timeout ran out."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TrtTimeout after `seconds` (0: no limit). run_worker has no time limit of its own, but it stops its
    worker (SIGTERM, then SIGKILL) on any exception raised while it waits, this one included."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TrtTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class TrtTarget:
    """How every probe model is parsed and built: TensorRT-RTX, ahead of time for one compute capability."""

    cc: str  # sm89
    decomposable: bool
    timeout: int

    def run(self, onnx_path: Path, build: bool) -> BuildResult:
        """Parse one model in the worker (with `build`, build it too); raises run_worker's WorkerFailed."""
        with tempfile.TemporaryDirectory(prefix="probe-trt-") as tmp:  # fresh: never a stale result.json
            scratch = Path(tmp)
            request = BuildRequest(
                backend="tensorrt_rtx",
                onnx=str(onnx_path),
                engine=str(scratch / "model.engine") if build else None,
                profiles=[],
                compute_capability=self.cc,
                decomposable_attention=self.decomposable,
            )
            return run_worker(request, scratch)


def _add_layers(res: TrtResult, result: BuildResult | None) -> None:
    if result is None:
        return
    res.layers_fused = result.layers
    res.notes.append("TRT layers: " + ", ".join(f"{n}x{t}" for t, n in sorted(result.layer_types.items())))


def _parse_only(path: Path, target: TrtTarget) -> BuildResult | None:
    try:
        return target.run(path, build=False)
    except WorkerFailed:
        return None


def _probe_trt_ref(res: TrtResult, ref_path: Path, target: TrtTarget) -> None:
    """Parse the decomposed reference, for its layer count."""
    try:
        res.layers_ref = target.run(ref_path, build=False).layers
    except WorkerFailed as exc:
        res.notes.append(trt_failure(exc).note.replace("TRT ", "TRT reference ", 1))


def _probe_trt_fused(res: TrtResult, fused_path: Path, target: TrtTarget) -> None:
    """Parse and build the fused model. When the build fails, a parse on its own recovers the layer counts."""
    try:
        result = target.run(fused_path, build=True)
    except WorkerFailed as exc:
        failure = trt_failure(exc)
        if failure.stage == "build":
            res.parse, res.build = "ok", failure.status
            _add_layers(res, _parse_only(fused_path, target))
        else:
            res.parse = failure.status
        res.notes.append(failure.note)
        return
    res.parse = res.build = "ok"
    _add_layers(res, result)


def probe_trt(case: Case, work: Path, target: TrtTarget) -> TrtResult:
    fused_path, ref_path = work / f"{case.name}.{case.dtype}.fused.onnx", work / f"{case.name}.{case.dtype}.ref.onnx"
    onnx.save(case.fused, fused_path)
    onnx.save(case.ref, ref_path)
    res = TrtResult()
    try:
        with _time_limit(target.timeout):
            _probe_trt_ref(res, ref_path, target)
            _probe_trt_fused(res, fused_path, target)
    except TrtTimeout:
        return TrtResult(parse=f"timeout ({target.timeout} s)", build=f"timeout ({target.timeout} s)")
    return res


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

Row = tuple[Case, OrtResult, TrtResult | None]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], with_trt: bool, provider_label: str) -> None:
    head = ["form", "dtype", f"ORT {provider_label}", "max rel err"]
    if with_trt:
        head += ["TRT parse", "TRT build", "layers f/ref"]
    head += ["ms fused", "ms ref", "ref/fused"]
    table = [head]
    for case, o, t in rows:
        row = [case.name, case.dtype, o.status, _fmt(o.error, ".1e")]
        if with_trt:
            assert t is not None
            row += [t.parse, t.build, f"{_fmt(t.layers_fused, 'd')}/{_fmt(t.layers_ref, 'd')}"]
        ratio = o.ms_ref / o.ms_fused if o.ms_ref is not None and o.ms_fused else None
        row += [_fmt(o.ms_fused, ".3f"), _fmt(o.ms_ref, ".3f"), _fmt(ratio, ".2f") + ("*" if o.ref_unoptimized else "")]
        table.append(row)
    print_columns(table, rule=True)
    notes = [f"  {c.name} [{c.dtype}]: {n}" for c, o, t in rows for n in o.notes + (t.notes if t else [])]
    print("\nNotes:", *notes or ["  (none)"], sep="\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--providers", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime execution provider")
    ap.add_argument("--no-trt", action="store_true", help="skip the TensorRT-RTX parse/build columns")
    ap.add_argument(
        "--cc",
        type=str.lower,
        choices=RTX_COMPUTE_CAPABILITIES,
        default="sm89",
        metavar="CC",
        help=f"TensorRT-RTX compute capability to build for ({', '.join(RTX_COMPUTE_CAPABILITIES)}; any case)",
    )
    ap.add_argument("--only", action="append", default=[], help="keep forms whose name contains this (repeatable)")
    ap.add_argument(
        "--dtypes",
        default="float32,float16",
        help="comma-separated; fp16 matters: TensorRT has attention kernels for some dtypes only",
    )
    ap.add_argument("--batch", type=int, default=2, help="batch > 1 exposes layouts that ignore the batch axis")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per session (median reported)")
    ap.add_argument(
        "--trt-timeout", type=int, default=300, help="seconds for the TensorRT parses and build of one form (0: none)"
    )
    ap.add_argument("--keep", type=Path, help="write the probe models here instead of a temporary directory")
    ap.add_argument(
        "--decomposable-attention",
        action="store_true",
        help="mark attention decomposable before the TensorRT build, as `llm2trt build` does",
    )
    return ap.parse_args(argv)


def ort_providers(choice: str) -> tuple[list[str], str] | None:
    """ONNX Runtime providers and the device IO binding puts inputs on; None when CUDA is asked for and absent."""
    if choice != "cuda":
        return ["CPUExecutionProvider"], "cpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDAExecutionProvider not available (have {ort.get_available_providers()})", file=sys.stderr)
        return None
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"


def trt_backend(no_trt: bool) -> Backend | None:
    if no_trt:
        return None
    try:
        return load_backend("tensorrt_rtx")
    except WorkerFailed:
        print("tensorrt_rtx is not importable: TensorRT columns skipped", file=sys.stderr)
        return None


def select_cases(sz: Sizes, dtypes: str, only: list[str]) -> list[Case]:
    cases: list[Case] = []
    for make in FAMILIES.values():
        for dt in (np.dtype(name.strip()) for name in dtypes.split(",")):
            cases += [c for c in make(sz, dt) if not only or any(o in c.name for o in only)]
    return cases


def run_cases(
    cases: list[Case], providers: list[str], device: str, runs: int, keep: Path | None, target: TrtTarget | None
) -> list[Row]:
    rows: list[Row] = []
    with work_dir(keep) as work:
        for case in cases:
            o = probe_ort(case, providers, device, runs)
            t = probe_trt(case, work, target) if target else None
            rows.append((case, o, t))
            print(f"... {case.name} [{case.dtype}] done", file=sys.stderr, flush=True)
    return rows


def print_header(sz: Sizes, backend: Backend | None, cc: str) -> None:
    versions = f"onnxruntime {ort.__version__}, onnx {onnx.__version__}"
    if backend is not None:
        versions += f", tensorrt_rtx {backend.version} (build for {cc.upper()})"
    print(
        f"Fused-op probe: {versions}; B={sz.batch} S={sz.seq} heads={sz.heads} kv_heads={sz.kv_heads} D={sz.head_dim}"
    )
    print(
        "max rel err = max|fused-ref|/max|ref| vs the decomposed graph; ref/fused = latency ratio (>1: fused faster)\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sz = Sizes(args.batch, args.seq, args.heads, args.kv_heads, args.head_dim)
    found = ort_providers(args.providers)
    if found is None:
        return 2
    providers, device = found
    backend = trt_backend(args.no_trt)
    target = TrtTarget(args.cc, args.decomposable_attention, args.trt_timeout) if backend else None
    cases = select_cases(sz, args.dtypes, args.only)

    started = time.perf_counter()
    rows = run_cases(cases, providers, device, args.runs, args.keep, target)
    print_header(sz, backend, args.cc)
    print_table(rows, backend is not None, args.providers.upper())
    print(f"\n{len(cases)} forms in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
