"""Mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert): the experts traced as one
llm2trt.MoE node a layer, counted like a fusion; greedy tokens equal to transformers' for every cache
form after optimize; the op's body against a NumPy reference (routing ties, a block of experts);
decoder engines under TensorRT-RTX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from llm2trt.passes.moe import moe_function_proto
from llm2trt.passes.ort_op_table import DOMAIN, MOE, VERSION
from tests.conftest import assert_clean_failure, run_cli, run_json
from tests.test_generate import NEW, hf_generate

MOE_MODELS = ["tiny:mixtral", "tiny:qwen3_moe", "tiny:qwen2_moe"]
PROMPTS = [[11, 57, 300, 8, 91], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [400, 3, 77], [9, 8, 7, 6, 5, 4, 3, 2]]
CC = ("--compute-capability", "sm89")


class Fused(dict[tuple[str, str], Path]):
    """Each model optimized into each cache form, once, on first use."""

    def __init__(self, artifacts: dict[str, Path], root: Path) -> None:
        super().__init__()
        self.artifacts, self.root = artifacts, root

    def __missing__(self, key: tuple[str, str]) -> Path:
        name, form = key
        out = self.root / f"{name[5:]}-{form}"
        code, report = run_json("optimize", self.artifacts[name], "-o", out, "--kv-form", form, "-q")
        assert code == 0, report
        # One MoE node a layer (the tiny configs' two), gated like a fusion.
        assert report["fusions"]["MoE"] == report["expected"]["MoE"] == 2 and not report["missing"]
        assert report["numeric_check"]["passed"], report["numeric_check"]
        self[key] = out
        return out


@pytest.fixture(scope="module")
def fused(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Fused:
    return Fused(artifacts, tmp_path_factory.mktemp("moe"))


@pytest.mark.parametrize("form", ["growing", "fixed", "gqa"])
@pytest.mark.parametrize("name", MOE_MODELS)
def test_moe_greedy_tokens_match_transformers(name: str, form: str, fused: Fused) -> None:
    artifact = fused[(name, form)]
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    moe = [n for n in graph.graph.node if n.domain == DOMAIN and n.op_type == MOE.name]
    assert len(moe) == 2 and any(f.name == MOE.name for f in graph.functions)
    model = resolve_model(name).load(DType.FP32)
    reference = hf_generate(model, PROMPTS, pad=0)
    assert all(len(r) == NEW for r in reference)  # no early EOS: all 32 tokens compared
    batch = generate(artifact, ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in batch.rows] == reference
    single = generate(artifact, ids=[PROMPTS[1]], sampling=Sampling(NEW))
    assert single.rows[0].new_ids == hf_generate(model, [PROMPTS[1]], pad=0)[0]


@pytest.mark.parametrize("name", MOE_MODELS)
def test_moe_decoder_engine_builds(name: str, fused: Fused, tmp_path: Path) -> None:
    code, info = run_json("build", fused[(name, "growing")], "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["profile_names"] == ["prefill", "decode"] and len(info["optimization_profiles"]) == 2
    assert info["attention_ops"] == 2


def _reference(
    x: np.ndarray, ids: np.ndarray, w: np.ndarray, gu: np.ndarray, down: np.ndarray, first: int
) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    inter = down.shape[2]
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j]) - first
            if not 0 <= e < gu.shape[0]:
                continue
            h = gu[e].astype(np.float64) @ x[n]
            gate, up = h[:inter], h[inter:]
            out[n] += w[n, j] * (down[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("first", [0, 4])
def test_moe_body_equals_the_reference(first: int) -> None:
    rng = np.random.default_rng(0)
    n, hidden, inter, experts, k = 7, 16, 8, 4, 2
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    gu = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) / 4
    down = rng.standard_normal((experts, hidden, inter)).astype(np.float32) / 4
    # Global ids over 8 experts: this block holds [first, first + 4); row 3 ties its two weights.
    ids = rng.permuted(np.tile(np.arange(8), (n, 1)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((n, k)).astype(np.float32)
    w[3] = 0.5
    inputs = [
        helper.make_tensor_value_info(name, elem, shape)
        for name, elem, shape in (
            ("X", onnx.TensorProto.FLOAT, ["n", hidden]),
            ("ExpertIds", onnx.TensorProto.INT64, ["n", k]),
            ("ExpertWeights", onnx.TensorProto.FLOAT, ["n", k]),
            ("GateUp", onnx.TensorProto.FLOAT, list(gu.shape)),
            ("Down", onnx.TensorProto.FLOAT, list(down.shape)),
        )
    ]
    node = helper.make_node(MOE.name, [i.name for i in inputs], ["Y"], domain=DOMAIN, first_expert=first)
    graph = helper.make_graph([node], "moe", inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(
        graph,
        functions=[moe_function_proto(23)],
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, VERSION)],
    )
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"X": x, "ExpertIds": ids, "ExpertWeights": w, "GateUp": gu, "Down": down}
    [y] = session.run(None, feeds)
    want = _reference(x, ids, w, gu, down, first)
    assert np.abs(want).max() > 0.1  # rows routed into the block
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_moe_cannot_be_skipped(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "skipped"
    result = run_cli("optimize", artifacts["tiny:mixtral"], "-o", out, "--skip-fusion", "MoE")
    assert_clean_failure(result, "--skip-fusion MoE: MoE is made at export, not by optimize", out)


@pytest.mark.parametrize(("method", "experts"), [("int4-rtn", 4), ("int8-wo", 4), ("int8-sq", 0)])
def test_moe_quantizes_experts_weight_only_and_keeps_the_router(
    method: str, experts: int, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / method
    calib = ["--calib", str(Path(__file__).parent / "data" / "text" / "calib.txt"), "--calib-samples", "2"]
    args = ["--quant", method, *(calib if method == "int8-sq" else [])]
    code, report = run_json("optimize", artifacts["tiny:qwen2_moe"], "-o", out, *args, "-q")
    assert code == 0, report
    assert report["numeric_check"]["passed"], report["numeric_check"]
    quant = report["quantization"]
    routers = [m for m, why in quant["kept"].items() if why.startswith("routes the experts")]
    assert routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    quantized_experts = [m for m in quant["quantized"] if m.endswith((".GateUp", ".Down"))]
    assert len(quantized_experts) == experts
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    feeding = {i for n in graph.node if n.op_type == MOE.name for i in n.input[3:5]}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in feeding]
    assert len(dqs) == experts and all({a.name: a.i for a in n.attribute}["axis"] == 2 for n in dqs)
    if not experts:  # W8A8: the experts stay in high precision, saying why
        assert all(
            "experts take weight-only methods" in quant["kept"][f"model.layers.{i}.mlp.experts.{w}"]
            for i in (0, 1)
            for w in ("GateUp", "Down")
        )


# --ep N alone: N ranks (attention split over them too); --tp T --ep N: the T ranks in N groups of
# experts, each expert's features split over a group's T / N ranks.
EP_CASES = [
    ("tiny:mixtral", ["--ep", "2"], 2),
    ("tiny:qwen2_moe", ["--tp", "2", "--ep", "2"], 2),
    ("tiny:qwen3_moe", ["--tp", "4", "--ep", "2"], 4),
]


@pytest.mark.parametrize(("name", "args", "ranks"), EP_CASES)
def test_expert_parallel_tokens_equal_transformers(
    name: str, args: list[str], ranks: int, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ep"
    code, result = run_json("optimize", artifacts[name], "-o", out, *args, "-q")
    assert code == 0, result
    assert result["numeric_check"]["passed"] and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5
    assert [r["counts"]["experts"] for r in result["ranks"]] == [2] * ranks  # each rank's two MoE layers
    record = Manifest.read(out).tensor_parallel
    assert record is not None and (record.tp, record.ep, len(record.ranks)) == (ranks, 2, ranks)
    model = resolve_model(name).load(DType.FP32)
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == hf_generate(model, PROMPTS, pad=0)


def test_expert_parallel_ranks_build_engines(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ep"
    assert run_cli("optimize", artifacts["tiny:mixtral"], "-o", out, "--ep", "2", "--no-check", "-q").exit_code == 0
    code, info = run_json("build", out, "-o", tmp_path / "engines", *CC, "-q")
    assert code == 0, info
    assert len(info["ranks"]) == 2
    for rank in info["ranks"]:
        assert rank["profile_names"] == ["prefill", "decode"]


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("tiny:mixtral", ["--ep", "3"], "--ep 3: 4 experts do not divide into 3 groups"),
        ("tiny:mixtral", ["--tp", "2", "--ep", "4"], "--ep 4 must divide the 2 ranks (--tp)"),
        ("tiny:llama", ["--ep", "2"], "--ep 2: llama has no mixture of experts to spread"),
    ],
)
def test_bad_expert_mappings_get_one_line(
    name: str, args: list[str], message: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bad"
    assert_clean_failure(run_cli("optimize", artifacts[name], "-o", out, *args), message, out)
