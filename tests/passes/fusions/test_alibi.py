"""BLOOM's fusions: the ALiBi attention rule on hand-built graphs written the way the TorchScript
exporter writes BLOOM's eager attention (3-D views, baddbmm, shape subgraphs), its refusals, the
GELU association order of bloom_gelu_forward, and tiny:bloom end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from llm2trt.passes.fusions.alibi import fits, shape_values
from tests.conftest import CC, run_cli, run_json
from tests.passes.fusions.test_rules import G, assert_same_numbers, fuse, ops, rand

RNG = np.random.default_rng(1)
H, D = 4, 8
BATCH, SEQ, TOTAL = 2, 3, 5  # three new tokens after two cached ones
SLOPES = np.asarray([[2.0 ** -(2 * (h + 1))] for h in range(H)], dtype=np.float32)  # (H, 1), as BLOOM's


def _scalar_dim(g: G, tensor: str, axis: int) -> str:
    return g.op("Gather", g.op("Shape", tensor), g.const(axis, np.int64), axis=0)


def _one(g: G, scalar: str) -> str:
    return g.op("Unsqueeze", scalar, g.const([0], np.int64))


def _alibi(g: G, dtype: type, heads_first: bool = False) -> str:
    """build_alibi_tensor: slopes * positions, (batch, heads, keys) viewed as (batch*heads, 1, keys)."""
    biases = g.op("Mul", g.const(SLOPES), g.op("Unsqueeze", "pos", g.const([1], np.int64)))  # (B, H, T)
    if heads_first:  # (heads, batch, keys): rows in the other order than the scores'
        biases = g.op("Transpose", biases, perm=[1, 0, 2])
    rows = g.op("Mul", _scalar_dim(g, "pos", 0), g.const(H, np.int64))
    shape = g.op("Concat", _one(g, rows), g.const([1], np.int64), _one(g, _scalar_dim(g, "pos", 1)), axis=0)
    alibi = g.op("Reshape", biases, shape)
    return g.op("Cast", alibi, to=TensorProto.FLOAT16) if dtype == np.float16 else alibi


def _layer(g: G, q: str, k: str, v: str, alibi: str, form: str, dtype: type, merge_heads: bool = True) -> str:
    """One BloomAttention.forward, from q/k/v (batch, heads, seq, dim) to the (batch, heads, seq, dim)
    context its _merge_heads starts from."""
    batch, seq = _scalar_dim(g, q, 0), _scalar_dim(g, q, 2)
    rows = g.op("Mul", batch, g.const(H, np.int64)) if merge_heads else batch

    def view(t: str) -> str:
        shape = g.op("Concat", _one(g, rows), g.const([-1], np.int64), g.const([D], np.int64), axis=0)
        return g.op("Reshape", t, shape)

    scores = g.op("MatMul", view(q), g.op("Transpose", view(k), perm=[0, 2, 1]))
    scores = g.op("Mul", scores, g.const(1 / math.sqrt(D), dtype))
    scores = g.op("Add", scores, g.op("Mul", alibi, g.const(1.0, dtype)))  # baddbmm, beta=1
    split = g.op("Concat", _one(g, batch), g.const([H], np.int64), _one(g, seq), g.const([-1], np.int64), axis=0)
    scores = g.op("Reshape", scores, split)
    if form == "fill":
        scores = g.op("Where", "masked", g.const(np.finfo(dtype).min, dtype), scores)
    elif form != "none":
        scores = g.op("Add", scores, "mask")
    probs = g.op("Softmax", scores, axis=-1)
    if dtype == np.float16:  # softmax(dtype=float32).to(fp16), as TorchScript writes it
        probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT), to=TensorProto.FLOAT16)
    merge = g.op("Concat", _one(g, rows), _one(g, seq), g.const([-1], np.int64), axis=0)
    context = g.op("MatMul", g.op("Reshape", probs, merge), view(v))
    # _merge_heads: (batch*heads, seq, dim) back to (batch, heads, seq, dim), read off the context's shape.
    back = g.op(
        "Concat",
        _one(g, g.op("Div", _scalar_dim(g, context, 0), g.const(H, np.int64))),
        g.const([H], np.int64),
        _one(g, _scalar_dim(g, context, 1)),
        g.const([D], np.int64),
        axis=0,
    )
    return g.op("Reshape", context, back)


def bloom_graph(
    form: str = "add", dtype: type = np.float32, layers: int = 2, heads_first: bool = False, merge_heads: bool = True
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`layers` attentions sharing one ALiBi term and one mask, their contexts summed."""
    g = G()
    alibi = _alibi(g, dtype, heads_first)
    out = None
    for i in range(layers):
        context = _layer(g, f"q{i}", f"k{i}", f"v{i}", alibi, form, dtype, merge_heads)
        out = context if out is None else g.op("Add", out, context)
    if dtype == np.float16:
        out = g.op("Cast", out, to=TensorProto.FLOAT)
    assert out is not None
    # Left padding in row 1; query i sits at slot TOTAL - SEQ + i.
    keep = np.ones((BATCH, TOTAL), dtype=np.float32)
    keep[1, :2] = 0
    allowed = (np.arange(TOTAL)[None, :] <= np.arange(TOTAL - SEQ, TOTAL)[:, None])[None] & (keep[:, None, :] > 0)
    feeds: dict[str, np.ndarray] = {"pos": ((np.cumsum(keep, axis=-1) - 1) * keep).astype(np.float32)}
    if form == "fill":
        feeds["masked"] = ~allowed[:, None]
    elif form != "none":
        feeds["mask"] = np.where(allowed[:, None], 0.0, np.finfo(dtype).min).astype(dtype)
    for i in range(layers):
        feeds |= {f"q{i}": rand(BATCH, H, SEQ, D), f"k{i}": rand(BATCH, H, TOTAL, D), f"v{i}": rand(BATCH, H, TOTAL, D)}
    inputs: dict[str, list[object]] = {"pos": ["batch", "total"], "mask": ["batch", 1, "seq", "total"]}
    inputs["masked"] = inputs["mask"]
    for i in range(layers):
        inputs |= {f"q{i}": ["batch", H, "seq", D]} | {f"{t}{i}": ["batch", H, "total", D] for t in "kv"}
    inputs = {name: shape for name, shape in inputs.items() if name in feeds}
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    dtypes = {name: elem for name in inputs if name[0] in "qkv" or name == "mask"} | {"masked": TensorProto.BOOL}
    feeds = {name: value.astype(dtype) if name[0] in "qkv" else value for name, value in feeds.items()}
    return g.model(inputs, out, dtypes=dtypes), feeds  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "form, dtype", [("add", np.float32), ("fill", np.float32), ("none", np.float32), ("add", np.float16)]
)
def test_alibi_attention_fuses_and_matches(form: str, dtype: type) -> None:
    proto, feeds = bloom_graph(form, dtype)
    model, result = fuse(proto, "Attention")
    attention = [n for n in model.graph.nodes if n.op == "Attention"]
    assert len(attention) == 2 and "Softmax" not in ops(model) and "Transpose" not in ops(model)
    assert result.counts == {"Attention.matmul_softmax": 0, "Attention.alibi": 2}
    for i, node in enumerate(attention):
        assert model.rule_of(node) == "Attention.alibi"
        # Q, K, V are the 4-D tensors before BLOOM's views: the cache's keys and values stay inputs 1, 2.
        assert [t.name for t in node.inputs[:3]] == [f"q{i}", f"k{i}", f"v{i}"]
        assert node.attrs["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-3)
        # fp16: the graph's softmax runs in fp16 (the casts after it are a round trip), and TensorRT
        # refuses Attention with softmax_precision.
        assert "softmax_precision" not in node.attrs
    # One bias (ALiBi viewed as (batch, heads, 1, keys), plus the mask) for every layer; without a
    # mask, each layer expands it to its queries (ONNX Runtime wants a row per query).
    first, second = (n.inputs[3] for n in attention)
    if form == "none":
        assert first.inputs[0].op == second.inputs[0].op == "Expand"
        assert first.inputs[0].inputs[0] is second.inputs[0].inputs[0]
    else:
        assert first is second and "Expand" not in ops(model)
    assert ops(model).count("Add") == (1 if form == "none" else 2)  # the layers' sum, the shared bias
    assert_same_numbers(proto, model, feeds, tol=2e-3 if dtype == np.float16 else 1e-5)


def test_alibi_rows_line_up_with_the_scores_whatever_built_them() -> None:
    """The graph adds ALiBi row r to score row r: viewed back as (batch, heads) they stay together,
    even where the term's rows were built (heads, batch) first."""
    proto, feeds = bloom_graph(heads_first=True, layers=1)
    model, _ = fuse(proto, "Attention")
    assert ops(model).count("Attention") == 1
    assert_same_numbers(proto, model, feeds)


def test_a_view_that_does_not_merge_batch_and_heads_is_refused() -> None:
    proto, _ = bloom_graph(merge_heads=False, layers=1)
    model, result = fuse(proto, "Attention")
    assert "Attention" not in ops(model)
    assert any("views Q as (batch*heads, seq, dim)" in r.reason for r in result.refusals)


def test_masked_fill_in_fp16_is_refused() -> None:
    proto, _ = bloom_graph("fill", np.float16, layers=1)
    model, result = fuse(proto, "Attention")
    assert "Attention" not in ops(model)
    assert any("masked_fill as an additive mask is exact in fp32 only" in r.reason for r in result.refusals)


def test_shape_subgraphs_read_as_named_dims() -> None:
    proto, _ = bloom_graph(layers=1)
    model, _ = fuse(proto, "RMSNorm")  # nothing to rewrite: the graph with its inferred shapes
    values = [shape_values(n.outputs[0]) for n in model.graph.nodes if n.op == "Concat"]
    assert [(4, ("batch",)), (1, ()), (1, ("total",))] in values  # the ALiBi view
    assert [(4, ("batch",)), (-1, ()), (D, ())] in values  # the q/k/v views
    assert [(1, ("batch",)), (H, ()), (1, ("seq",)), (-1, ())] in values  # the scores' split
    q_view = [(4, ("batch",)), (1, ("seq",)), (D, ())]
    assert fits([(4, ("batch",)), (-1, ()), (D, ())], q_view)
    assert not fits([(-1, ()), (-1, ()), (D, ())], q_view)
    assert not fits([(1, ("batch",)), (-1, ()), (D, ())], q_view)


# -- BLOOM's GELU -------------------------------------------------------------------------------


def test_bloom_gelu_order_fuses_to_tanh_gelu() -> None:
    """bloom_gelu_forward: x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))."""
    g = G()
    inner = g.op("Add", g.op("Mul", g.op("Mul", "x", g.const(0.044715)), "x"), g.const(1.0))
    t = g.op("Tanh", g.op("Mul", g.op("Mul", "x", g.const(0.79788456)), inner))
    out = g.op("Mul", g.op("Mul", "x", g.const(0.5)), g.op("Add", t, g.const(1.0)))
    proto = g.model({"x": [2, 5, 16]}, out)
    model, result = fuse(proto, "Gelu")
    assert ops(model) == ["Gelu"] and model.graph.nodes[0].attrs["approximate"] == "tanh"
    assert result.counts["Gelu.tanh"] == 1
    assert_same_numbers(proto, model, {"x": 3 * rand(2, 5, 16)})


def test_bloom_gelu_with_another_constant_is_not_fused() -> None:
    g = G()
    inner = g.op("Add", g.op("Mul", g.op("Mul", "x", g.const(0.1)), "x"), g.const(1.0))  # not 0.044715
    t = g.op("Tanh", g.op("Mul", g.op("Mul", "x", g.const(0.79788456)), inner))
    out = g.op("Mul", g.op("Mul", "x", g.const(0.5)), g.op("Add", t, g.const(1.0)))
    model, result = fuse(g.model({"x": [2, 5, 16]}, out), "Gelu")
    assert "Gelu" not in ops(model)
    assert any("unexpected value" in r.reason for r in result.refusals)


# -- tiny:bloom end to end ------------------------------------------------------------------------

EXPECTED = {"Attention": 2, "LayerNorm": 6, "Gelu": 2}


def test_tiny_bloom_fp16_fuses_within_tolerance(tmp_path: Path) -> None:
    base = tmp_path / "bloom16"
    assert run_cli("convert", "tiny:bloom", "-o", base, "--dtype", "fp16", "-q").exit_code == 0
    code, report = run_json("optimize", base, "-o", tmp_path / "opt", "-q")
    assert code == 0, report
    assert {k: v for k, v in report["fusions"].items() if v} == EXPECTED
    assert report["rules"]["Attention.alibi"] == 2 and report["numeric_check"]["passed"]
    proto = onnx.load(str(tmp_path / "opt" / "model.onnx"), load_external_data=False)
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert [n.input[1] for n in attention] == ["present.0.key", "present.1.key"]
    assert not [n for n in proto.graph.node if n.op_type in ("Softmax", "Tanh")]
    # TensorRT parses it (it refuses Attention with softmax_precision) and keeps both attentions.
    code, info = run_json("build", tmp_path / "opt", "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["precision"] == "fp16" and info["attention_ops"] == 2


def test_tiny_bloom_cache_insertion_keeps_alibi(tmp_path: Path) -> None:
    base = tmp_path / "bloom-nocache"
    assert run_cli("convert", "tiny:bloom", "-o", base, "--no-kv-cache", "-q").exit_code == 0
    code, report = run_json("optimize", base, "-o", tmp_path / "opt", "--kv-cache", "-q")
    # The insertion's own mask replaces attn_mask, which carried the ALiBi term too: the pass adds the
    # term back (a graph without it diverges at 1.9e-3).
    assert code == 0, json.dumps(report)
    assert report["numeric_check"]["passed"]
