"""Quantized weights in the fast CUDA form (`--quant ... --kv-form gqa`): the NBits layout is the
DequantizeLinear's values exactly, the quantized gqa graph uses the NBits ops, and it decodes the
same tokens as the quantized standard graph (ONNX Runtime CPU runs the ops' reference bodies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from llm2trt.passes.manager import Model
from llm2trt.passes.nbits import concatenated, nbits_weight, pack_nbits, unpack_nbits
from tests.conftest import run_json


def _dequantize_graph(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, attrs: dict[str, Any]) -> Model:
    model = Model(gs.Graph(opset=21))
    # Model.constant: ONNX's own serializer packs INT4 (two codes a byte).
    inputs = [model.constant("codes", codes), model.constant("scale", scale)]
    if zero is not None:
        inputs.append(model.constant("zero", zero))
    w = gs.Variable("w", dtype=scale.dtype, shape=list(codes.shape))
    x = gs.Variable("x", dtype=scale.dtype, shape=[1, codes.shape[0]])
    y = gs.Variable("y", dtype=scale.dtype, shape=[1, codes.shape[1]])
    model.graph.nodes = [
        gs.Node("DequantizeLinear", "dq", attrs, inputs, [w]),
        gs.Node("MatMul", "mm", {}, [x, w], [y]),
    ]
    model.graph.inputs, model.graph.outputs = [x], [w, y]
    return model


def _onnx_runtime_weight(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, attrs: dict[str, Any]
) -> np.ndarray:
    """DequantizeLinear's output as ONNX Runtime computes it (the graph written with ONNX's helpers)."""
    names = ["codes", "scale", *(["zero"] if zero is not None else [])]
    values = [codes, scale, *([zero] if zero is not None else [])]
    initializers = [onnx.numpy_helper.from_array(v, n) for n, v in zip(names, values, strict=True)]
    node = onnx.helper.make_node("DequantizeLinear", names, ["w"], **attrs)
    out = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT16, None)
    graph = onnx.helper.make_graph([node], "dq", [], [out], initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["w"], {})[0])


CASES = {
    "int4 blocks": (ml_dtypes.int4, -8, 8, {"axis": 0, "block_size": 32}, False),
    "uint4 blocks, zero points": (ml_dtypes.uint4, 0, 16, {"axis": 0, "block_size": 16}, True),
    "int8 per channel": (np.int8, -127, 128, {"axis": 1}, False),
    "int8 blocks": (np.int8, -128, 128, {"axis": 0, "block_size": 64}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nbits_layout_is_the_dequantize_exactly(case: str) -> None:
    dtype, low, high, attrs, zeros = CASES[case]
    rng = np.random.default_rng(0)
    k, n = 128, 24
    codes = rng.integers(low, high, (k, n)).astype(dtype)
    block = attrs.get("block_size", 0)
    scale_shape = (k // block, n) if block else (n,)
    scale = rng.uniform(1e-3, 3e-2, scale_shape).astype(np.float16)
    zero = rng.integers(low, high, scale_shape).astype(dtype) if zeros else None
    model = _dequantize_graph(codes, scale, zero, attrs)
    found = nbits_weight(model.graph.nodes[0].outputs[0])
    assert found is not None
    assert found.bits == (4 if "4" in case else 8) and found.block == (block or k)
    assert found.codes.shape == (n, k) and found.scales.shape == found.zeros.shape == (n, k // (block or k))
    assert np.array_equal(unpack_nbits(found.packed, found.bits), found.codes)
    assert found.packed.shape == (n, k * found.bits // 8)
    # (code - zero) * scale is what DequantizeLinear computes, to the bit once rounded to float16.
    expected = _onnx_runtime_weight(codes, scale, zero, attrs)
    assert np.array_equal(found.dequantized().T.astype(np.float16), expected)


def test_packing_puts_the_even_code_in_the_low_nibble() -> None:
    assert pack_nbits(np.array([[1, 2, 15, 0]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert unpack_nbits(np.array([[0x21, 0x0F]], np.uint8), 4).tolist() == [[1, 2, 15, 0]]


def test_q_k_v_concatenate_as_one_dequantize() -> None:
    rng = np.random.default_rng(1)
    widths = (32, 16, 16)
    weights, graph_nodes = [], []
    model = Model(gs.Graph(opset=21))
    for i, width in enumerate(widths):
        codes = model.constant(f"c{i}", rng.integers(-8, 8, (64, width)).astype(ml_dtypes.int4))
        scale = model.constant(f"s{i}", rng.uniform(0.01, 0.02, (2, width)).astype(np.float16))
        out = gs.Variable(f"w{i}", dtype=np.float16, shape=[64, width])
        graph_nodes.append(gs.Node("DequantizeLinear", f"dq{i}", {"axis": 0, "block_size": 32}, [codes, scale], [out]))
        weights.append(out)
    model.graph.nodes, model.graph.outputs = graph_nodes, list(weights)
    joined = concatenated(model, weights, "qkv")
    assert joined is not None and joined.shape == [64, 64]
    parts = [nbits_weight(w) for w in weights]
    whole = nbits_weight(joined)
    assert whole is not None and all(p is not None for p in parts)
    assert np.array_equal(whole.codes, np.concatenate([p.codes for p in parts if p is not None]))
    # Unlike blocks do not join.
    graph_nodes[2].attrs["block_size"] = 16
    graph_nodes[2].inputs[1] = gs.Constant("s2b", rng.uniform(0.01, 0.02, (4, 16)).astype(np.float16))
    assert concatenated(model, weights, "qkv2") is None


PROMPTS = [[5, 17, 99, 3, 250], [7, 8], [42, 11, 600, 31, 9, 77, 2]]


@pytest.mark.parametrize(
    ("method", "args", "ops"),
    [
        ("int4-rtn", ["--group-size", "32"], {"SkipRMSNormSwiGLUNBits": 2, "LinearNBits": 4}),
        ("int8-wo", [], {"SkipRMSNormSwiGLUNBits": 2, "LinearNBits": 4}),
    ],
)
def test_quantized_gqa_graph_runs_nbits_ops_and_decodes_the_same_tokens(
    method: str, args: list[str], ops: dict[str, int], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    source = artifacts["tiny:llama"]
    code, plain = run_json("optimize", source, "-o", tmp_path / "plain", "--quant", method, *args, "-q")
    assert code == 0, plain
    code, report = run_json(
        "optimize", source, "-o", tmp_path / "gqa", "--quant", method, *args, "--kv-form", "gqa", "-q"
    )
    assert code == 0, report
    counts = next(p["counts"] for p in report["passes"] if p["name"] == "ort_kernels")
    assert {op: counts[op] for op in ops} == ops
    # Every quantized layer went to an NBits op: no DequantizeLinear is left in the graph.
    proto = onnx.load(str(tmp_path / "gqa" / "model.onnx"), load_external_data=False)
    assert not [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    kernels = {n.op_type for n in proto.graph.node if n.domain == "llm2trt"}
    assert {"RMSNormLinearNBits", "SkipRMSNormLinearNBits"} <= kernels
    manifest = Manifest.read(tmp_path / "gqa")
    assert manifest.quantization is not None and manifest.quantization.method == method
    want = generate(tmp_path / "plain", ids=PROMPTS, sampling=Sampling(16))
    got = generate(tmp_path / "gqa", ids=PROMPTS, sampling=Sampling(16))
    assert [r.new_ids for r in got.rows] == [r.new_ids for r in want.rows]
