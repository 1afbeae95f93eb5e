"""Each fusion rule on a tiny hand-built graph: the resulting op list, numerics in ONNX Runtime
against the unfused graph on random inputs, and the reason a near-miss is refused."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.passes.fusions import FUSIONS
from llm2trt.passes.manager import RULE_KEY, Model, PassResult, check_graph
from llm2trt.passes.pattern import RewritePass

RNG = np.random.default_rng(0)
B, H, KV, S, D = 2, 4, 2, 5, 8


class G:
    """A little graph builder: nodes in order, constants as initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, value: object, dtype: type = np.float32) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, *inputs: str, **attrs: object) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"/model/layers.0/blk/{op}_{self.n}", **attrs))
        return out

    def model(
        self, inputs: dict[str, list[int]], output: str, opset: int = 23, dtypes: dict[str, int] | None = None
    ) -> onnx.ModelProto:
        dtypes = dtypes or {}
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(k, dtypes.get(k, TensorProto.FLOAT), v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def fuse(proto: onnx.ModelProto, fusion: str) -> tuple[Model, PassResult]:
    model = Model.from_onnx(proto)
    from llm2trt.passes.cleanup import infer_shapes

    infer_shapes(model)
    rewrite = RewritePass(f"fuse_{fusion.lower()}", [rule() for rule in FUSIONS.get(fusion).rules])
    result = rewrite.run(model)
    check_graph(model)
    return model, result


def ops(model: Model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def assert_same_numbers(proto: onnx.ModelProto, model: Model, feeds: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    ref = run_ort(proto.SerializeToString(), feeds, disable_optimizations=True)
    got = run_ort(model.to_onnx().SerializeToString(), feeds)
    for name, value in ref.items():
        assert normwise_rel_err(got[name], value) <= tol, name


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# -- LayerNorm --------------------------------------------------------------------------------


def layernorm_graph(bias: bool = True, axis: int = -1, opset: int = 17) -> onnx.ModelProto:
    g = G()
    axes = {"axes": [axis]} if opset < 18 else {}
    extra = [] if opset < 18 else [g.const([axis], np.int64)]
    mean = g.op("ReduceMean", "x", *extra, keepdims=1, **axes)
    d = g.op("Sub", "x", mean)
    var = g.op("ReduceMean", g.op("Pow", d, g.const(2.0)), *extra, keepdims=1, **axes)
    normed = g.op("Div", d, g.op("Sqrt", g.op("Add", var, g.const(1e-5))))
    out = g.op("Mul", normed, g.const(RNG.standard_normal(16)))
    if bias:
        out = g.op("Add", out, g.const(RNG.standard_normal(16)))
    return g.model({"x": [3, 7, 16]}, out, opset=opset)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opset", [17, 18])
def test_layernorm_fuses_with_and_without_bias(bias: bool, opset: int) -> None:
    proto = layernorm_graph(bias=bias, opset=opset)
    model, _ = fuse(proto, "LayerNorm")
    assert ops(model) == ["LayerNormalization"]
    node = model.graph.nodes[0]
    assert len(node.inputs) == (3 if bias else 2) and node.attrs["epsilon"] == pytest.approx(1e-5)
    assert model.rule_of(node) == "LayerNorm.decomposed"
    assert_same_numbers(proto, model, {"x": rand(3, 7, 16)})


def test_layernorm_over_another_axis_is_refused_with_its_reason() -> None:
    g = G()
    mean = g.op("ReduceMean", "x", keepdims=1, axes=[1])
    d = g.op("Sub", "x", mean)
    var = g.op("ReduceMean", g.op("Pow", d, g.const(2.0)), keepdims=1, axes=[1])
    normed = g.op("Div", d, g.op("Sqrt", g.op("Add", var, g.const(1e-5))))
    out = g.op("Add", g.op("Mul", normed, g.const(np.ones(16))), g.const(np.zeros(16)))
    model, rewrite = fuse(g.model({"x": [3, 7, 16]}, out), "LayerNorm")
    assert "LayerNormalization" not in ops(model)
    assert any("reduces over axes [1], not the last axis" in r.reason for r in rewrite.refusals)


# -- RMSNorm ----------------------------------------------------------------------------------


def rmsnorm_graph(fp16: bool = False) -> onnx.ModelProto:
    g = G()
    x = g.op("Cast", "x", to=TensorProto.FLOAT) if fp16 else "x"
    mean = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.const([-1], np.int64), keepdims=1)
    rstd = g.op("Div", g.const(1.0), g.op("Sqrt", g.op("Add", mean, g.const(1e-6))))
    normed = g.op("Mul", x, rstd)
    if fp16:
        normed = g.op("Cast", normed, to=TensorProto.FLOAT16)
    weight = g.const(RNG.standard_normal(16), np.float16 if fp16 else np.float32)
    out = g.op("Mul", weight, normed)
    if fp16:
        out = g.op("Cast", out, to=TensorProto.FLOAT)
    return g.model({"x": [2, 5, 16]}, out, dtypes={"x": TensorProto.FLOAT16} if fp16 else None)


@pytest.mark.parametrize("fp16", [False, True])
def test_rmsnorm_fuses_including_fp16_casts(fp16: bool) -> None:
    proto = rmsnorm_graph(fp16)
    model, _ = fuse(proto, "RMSNorm")
    assert ops(model) == (["RMSNormalization", "Cast"] if fp16 else ["RMSNormalization"])
    node = model.graph.nodes[0]
    assert node.attrs["stash_type"] == 1 and node.attrs["epsilon"] == pytest.approx(1e-6)
    x = rand(2, 5, 16).astype(np.float16 if fp16 else np.float32)
    assert_same_numbers(proto, model, {"x": x}, tol=2e-3 if fp16 else 1e-5)


def test_rmsnorm_with_a_weight_of_the_wrong_width_is_refused() -> None:
    g = G()
    mean = g.op("ReduceMean", g.op("Pow", "x", g.const(2.0)), g.const([-1], np.int64), keepdims=1)
    normed = g.op("Mul", "x", g.op("Div", g.const(1.0), g.op("Sqrt", g.op("Add", mean, g.const(1e-6)))))
    out = g.op("Mul", g.const(np.ones((5, 16))), normed)
    model, rewrite = fuse(g.model({"x": [2, 5, 16]}, out), "RMSNorm")
    assert "RMSNormalization" not in ops(model)
    assert any("weight has shape [5, 16], expected [16]" in r.reason for r in rewrite.refusals)


# -- GELU -------------------------------------------------------------------------------------


def gelu_erf_graph() -> onnx.ModelProto:
    g = G()
    erf = g.op("Erf", g.op("Div", "x", g.const(math.sqrt(2.0))))
    out = g.op("Mul", g.op("Mul", "x", g.op("Add", erf, g.const(1.0))), g.const(0.5))
    return g.model({"x": [2, 5, 16]}, out)


def gelu_tanh_graph() -> onnx.ModelProto:
    g = G()
    cube = g.op("Pow", "x", g.const(3.0))
    inner = g.op("Add", "x", g.op("Mul", cube, g.const(0.044715)))
    t = g.op("Tanh", g.op("Mul", inner, g.const(math.sqrt(2.0 / math.pi))))
    out = g.op("Mul", g.op("Mul", "x", g.const(0.5)), g.op("Add", t, g.const(1.0)))
    return g.model({"x": [2, 5, 16]}, out)


@pytest.mark.parametrize("make, approximate", [(gelu_erf_graph, "none"), (gelu_tanh_graph, "tanh")])
def test_gelu_forms(make: Callable[[], onnx.ModelProto], approximate: str) -> None:
    proto = make()
    model, _ = fuse(proto, "Gelu")
    assert ops(model) == ["Gelu"]
    assert model.graph.nodes[0].attrs["approximate"] == approximate
    assert_same_numbers(proto, model, {"x": 3 * rand(2, 5, 16)})


def test_gelu_with_a_wrong_constant_is_not_fused() -> None:
    g = G()
    erf = g.op("Erf", g.op("Div", "x", g.const(1.5)))  # not sqrt(2): some other function
    out = g.op("Mul", g.op("Mul", "x", g.op("Add", erf, g.const(1.0))), g.const(0.5))
    model, rewrite = fuse(g.model({"x": [2, 5, 16]}, out), "Gelu")
    assert "Gelu" not in ops(model)
    assert any("unexpected value" in r.reason for r in rewrite.refusals)


# -- RoPE -------------------------------------------------------------------------------------


def rope_graph(rotary: int = D) -> onnx.ModelProto:
    """Llama's apply_rotary_pos_emb on q (B, H, S, D) with cos/sin from cat(freqs, freqs)."""
    g = G()
    freqs = g.op("Mul", "pos", g.const(RNG.uniform(0.1, 1.0, D // 2)))  # (B, S, D/2)
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos = g.op("Unsqueeze", g.op("Cos", emb), g.const([1], np.int64))
    sin = g.op("Unsqueeze", g.op("Sin", emb), g.const([1], np.int64))
    half = rotary // 2
    first = g.op(
        "Slice", "q", g.const([0], np.int64), g.const([half], np.int64), g.const([3], np.int64), g.const([1], np.int64)
    )
    second = g.op(
        "Slice",
        "q",
        g.const([half], np.int64),
        g.const([2**62], np.int64),
        g.const([3], np.int64),
        g.const([1], np.int64),
    )
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    out = g.op("Add", g.op("Mul", "q", cos), g.op("Mul", rotated, sin))
    return g.model({"q": [B, H, S, D], "pos": [B, S, 1]}, out)


def test_rope_fuses_and_matches() -> None:
    proto = rope_graph()
    model, _ = fuse(proto, "RoPE")
    assert ops(model).count("RotaryEmbedding") == 1 and "Neg" not in ops(model)
    rope = next(n for n in model.graph.nodes if n.op == "RotaryEmbedding")
    assert rope.attrs["interleaved"] == 0 and len(rope.inputs) == 3
    pos = np.broadcast_to(np.arange(S, dtype=np.float32)[None, :, None], (B, S, 1)).copy()
    assert_same_numbers(proto, model, {"q": rand(B, H, S, D), "pos": pos})


def test_partial_rotary_is_refused_with_its_reason() -> None:
    model, rewrite = fuse(rope_graph(rotary=D // 2), "RoPE")
    assert "RotaryEmbedding" not in ops(model)
    assert any("partial rotary" in r.reason for r in rewrite.refusals)


# -- Attention --------------------------------------------------------------------------------


def attention_graph(form: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """softmax(QK^T * scale + mask) V as the exporters write it.

    sdpa_gqa: sqrt(scale) on Q and K^T, additive mask, repeat_kv on K and V (Llama, sdpa).
    eager_mask: scores * scale, additive mask (GPT-2 / BERT eager).
    div_nomask: scores / sqrt(d), no mask (ViT-like).
    folded: no scale at all (scaling folded into the Q weights).
    """
    g = G()
    feeds = {"q": rand(B, H, S, D)}
    scale = 1 / math.sqrt(D)
    if form == "sdpa_gqa":
        feeds |= {"k": rand(B, KV, S, D), "v": rand(B, KV, S, D)}

        def repeat(t: str) -> str:
            u = g.op("Unsqueeze", t, g.const([2], np.int64))
            e = g.op("Expand", u, g.const([B, KV, H // KV, S, D], np.int64))
            return g.op("Reshape", e, g.const([B, H, S, D], np.int64))

        k, v = repeat("k"), repeat("v")
        kt = g.op("Transpose", k, perm=[0, 1, 3, 2])
        scores = g.op("MatMul", g.op("Mul", "q", g.const(math.sqrt(scale))), g.op("Mul", kt, g.const(math.sqrt(scale))))
    else:
        feeds |= {"k": rand(B, S, H, D), "v": rand(B, H, S, D)}
        kt = g.op("Transpose", "k", perm=[0, 2, 3, 1])  # (B, S, H, D) -> K^T directly, like GPT-2
        v = "v"
        scores = g.op("MatMul", "q", kt)
        if form == "eager_mask":
            scores = g.op("Mul", scores, g.const(scale))
        elif form == "div_nomask":
            scores = g.op("Div", scores, g.const(math.sqrt(D)))
    if form in ("sdpa_gqa", "eager_mask"):
        mask = np.where(np.tril(np.ones((S, S), dtype=bool)), 0, -3.4e38).astype(np.float32)
        feeds["mask"] = np.broadcast_to(mask, (B, 1, S, S)).copy()
        scores = g.op("Add", scores, "mask")
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    inputs = {name: list(value.shape) for name, value in feeds.items()}
    return g.model(inputs, out), feeds


@pytest.mark.parametrize("form", ["sdpa_gqa", "eager_mask", "div_nomask", "folded"])
def test_attention_forms(form: str) -> None:
    proto, feeds = attention_graph(form)
    model, _ = fuse(proto, "Attention")
    attention = [n for n in model.graph.nodes if n.op == "Attention"]
    assert len(attention) == 1 and "Softmax" not in ops(model)
    node = attention[0]
    expected_scale = 1.0 if form == "folded" else 1 / math.sqrt(D)
    assert node.attrs["scale"] == pytest.approx(expected_scale, rel=1e-6)
    assert len(node.inputs) == (4 if "mask" in feeds else 3)
    if form == "sdpa_gqa":  # repeat_kv undone: Attention reads K and V with KV heads
        assert node.inputs[1].name == "k" and node.inputs[2].name == "v"
        assert "Expand" not in ops(model)
    assert model.rule_of(node) == "Attention.matmul_softmax"
    assert_same_numbers(proto, model, feeds)


def test_attention_softmax_over_another_axis_is_refused() -> None:
    g = G()
    scores = g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 1, 3, 2]))
    out = g.op("MatMul", g.op("Softmax", scores, axis=2), "v")
    model, rewrite = fuse(g.model({"q": [B, H, S, D], "k": [B, H, S, D], "v": [B, H, S, D]}, out), "Attention")
    assert "Attention" not in ops(model)
    assert any("softmax over axis 2, not the key axis" in r.reason for r in rewrite.refusals)


def test_intermediate_used_elsewhere_is_refused() -> None:
    g = G()
    scores = g.op("MatMul", "q", g.op("Transpose", "k", perm=[0, 1, 3, 2]))
    probs = g.op("Softmax", scores, axis=-1)
    out = g.op("Add", g.op("MatMul", probs, "v"), g.op("ReduceSum", probs, g.const([-1], np.int64), keepdims=1))
    model, rewrite = fuse(g.model({"q": [B, H, S, D], "k": [B, H, S, D], "v": [B, H, S, D]}, out), "Attention")
    assert "Attention" not in ops(model)
    assert any("is also read by" in r.reason for r in rewrite.refusals)


def test_new_nodes_carry_their_rule_in_the_saved_graph() -> None:
    proto, _ = attention_graph("eager_mask")
    model, _ = fuse(proto, "Attention")
    saved = model.to_onnx()
    tagged = {n.op_type: {p.key: p.value for p in n.metadata_props} for n in saved.graph.node}
    assert tagged["Attention"] == {RULE_KEY: "Attention.matmul_softmax"}
