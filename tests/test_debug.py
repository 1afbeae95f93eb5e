"""Layer-output debugging: `compare --mark`, goldens, `debug bisect`, marks at fusion boundaries."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from llm2trt.backends.base import rounds_of
from llm2trt.compare.golden import Golden
from llm2trt.compare.marks import GraphMap, fusion_splits
from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import PROFILES, errors, profile_for
from llm2trt.passes.fusions import count_fusions
from llm2trt.passes.manager import Model
from llm2trt.passes.pipeline import PipelineOptions, assemble
from tests.conftest import assert_clean_failure, run_cli, run_json
from tests.corrupt import corrupt_linear

GOLDENS = Path(__file__).parent / "data" / "golden"

# One linear per architecture, in the last layer (so the earlier layer must pass).
CORRUPTED = {
    "tiny:llama": "model.layers.1.mlp.down_proj",
    "tiny:gpt2": "transformer.h.1.mlp.c_fc",
    "tiny:bert": "encoder.layer.1.intermediate.dense",
    "tiny:qwen3": "model.layers.1.self_attn.k_proj",  # read through QK-norm
    "tiny:gemma3": "model.layers.1.mlp.up_proj",
}


@pytest.fixture(scope="module")
def fused(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    out = {}
    for name in CORRUPTED:
        path = root / name.split(":")[1]
        result = run_cli("optimize", artifacts[name], "-o", path, "-q")
        assert result.exit_code == 0, result.stderr
        out[name] = path
    return out


def _check_flags(artifact: Path, module: str, *extra: str) -> None:
    code, data = run_json("compare", artifact, "--mark", "all", *extra)
    assert code == 1
    breach = data["first_breach"]
    assert breach["module"] == module, breach
    rows = data["results"]
    first = next(i for i, r in enumerate(rows) if not r["passed"])
    assert rows[first]["module"] == module
    assert all(r["passed"] for r in rows[:first])  # everything before it, earlier layers included
    assert any(r["module"] and r["module"].startswith(module.rsplit(".", 3)[0] + ".0") for r in rows[:first])
    assert data["marked"] >= 15 and data["segments"] >= 3

    code, found = run_json("debug", "bisect", artifact, *extra)
    assert code == 1
    assert found["module"] == module and found["onnx_tensor"] == breach["onnx_tensor"]
    assert found["rounds"] == 3  # two layers: two halvings, then one round inside the layer
    assert [p["breach"] is not None for p in found["probes"]] == [True, False, True]


@pytest.mark.parametrize("name", list(CORRUPTED))
def test_corrupted_linear_is_flagged_and_bisected(name: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    broken = corrupt_linear(artifacts[name], CORRUPTED[name], tmp_path / "broken")
    _check_flags(broken, CORRUPTED[name])


@pytest.mark.parametrize("name", list(CORRUPTED))
def test_corrupted_linear_in_fused_artifact(name: str, fused: dict[str, Path], tmp_path: Path) -> None:
    broken = corrupt_linear(fused[name], CORRUPTED[name], tmp_path / "broken")
    _check_flags(broken, CORRUPTED[name])


def test_bisect_a_decode_step_of_the_kv_graph(artifacts: dict[str, Path], tmp_path: Path) -> None:
    module = CORRUPTED["tiny:llama"]
    broken = corrupt_linear(artifacts["tiny:llama"], module, tmp_path / "broken")
    code, found = run_json("debug", "bisect", broken, "--sequence", "1", "--batch", "2")
    assert code == 1 and found["module"] == module


def test_clean_artifact_passes_every_mark(artifacts: dict[str, Path]) -> None:
    code, data = run_json("compare", artifacts["tiny:llama"], "--mark", "all")
    assert code == 0 and data["first_breach"] is None
    modules = [r["module"] for r in data["results"]]
    assert "model.layers.0.self_attn.q_proj" in modules and "model.norm" in modules
    # Graph order: layer 0 before layer 1, the logits (lm_head) after the final norm.
    assert modules.index("model.layers.0.mlp.down_proj") < modules.index("model.layers.1.input_layernorm")
    assert modules.index("model.norm") < modules.index("lm_head")
    assert all(r["cosine"] > 0.999999 for r in data["results"])
    code, bisected = run_json("debug", "bisect", artifacts["tiny:llama"])
    assert code == 0 and bisected["onnx_tensor"] is None and bisected["rounds"] == 2


def test_mark_regex_selects_modules(artifacts: dict[str, Path]) -> None:
    code, data = run_json("compare", artifacts["tiny:gpt2"], "--mark", r"h\.1\.mlp")
    assert code == 0
    marked = [r["module"] for r in data["results"] if r["module"] and r["output"] not in ("logits",)]
    assert marked == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.act", "transformer.h.1.mlp.c_proj"]


# -- fusion boundaries --------------------------------------------------------------------------


def _fusion_counts(proto: onnx.ModelProto, marks: list[str]) -> dict[str, int]:
    """What `optimize`'s pipeline fuses in the graph with `marks` as extra outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in marks:
        proto.graph.output.add().name = name
    model = Model.from_onnx(proto)
    assemble(PipelineOptions()).run(model)
    return count_fusions(model.graph)


@pytest.mark.parametrize("name", list(CORRUPTED))
def test_module_marks_sit_at_fusion_boundaries(name: str, artifacts: dict[str, Path], fused: dict[str, Path]) -> None:
    path = artifacts[name] / "model.onnx"
    proto = onnx.load(str(path), load_external_data=True)
    graph_map = GraphMap.of(proto)
    marks = [m.tensor for m in graph_map.marks]
    unmarked = _fusion_counts(proto, [])
    assert sum(unmarked.values()) >= 6
    assert _fusion_counts(proto, marks) == unmarked  # every module output marked, every fusion kept
    assert fusion_splits(path, graph_map, graph_map.marks) == []
    # A mark inside attention (the softmax) is reported and does split it.
    softmax = [n.output[0] for n in proto.graph.node if n.op_type == "Softmax"][:1]
    splits = fusion_splits(path, graph_map, [m for m in graph_map.select("Softmax") if m.tensor in softmax])
    assert [s.fusion for s in splits] == ["Attention"]
    assert _fusion_counts(proto, softmax)["Attention"] == unmarked["Attention"] - 1
    # The fused artifact: marking every module output leaves its fused ops as they are.
    fused_map = GraphMap.of(onnx.load(str(fused[name] / "model.onnx"), load_external_data=False))
    assert fusion_splits(fused[name] / "model.onnx", fused_map, fused_map.marks) == []


def test_trt_mark_inside_a_fusion_warns(fused: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    # The transposed key feeding BERT's fused Attention is inside the rewrite; TensorRT cannot run
    # here, so the command stops after the warning with one clear line.
    result = run_cli("compare", fused["tiny:bert"], "--runners", "torch,trt", "--mark", "key_bhsd")
    assert caplog.text.count("splits the Attention.matmul_softmax fusion") == 2  # one per layer
    assert_clean_failure(result, "cannot run marked")


# -- goldens ------------------------------------------------------------------------------------


def test_golden_round_trip(artifacts: dict[str, Path], tmp_path: Path) -> None:
    artifact = artifacts["tiny:llama"]
    golden = tmp_path / "llama.npz"
    code, saved = run_json("compare", artifact, "--mark", "all", "--save-golden", golden)
    assert code == 0 and golden.is_file()
    assert not list(tmp_path.glob("*.partial"))
    index = Golden(golden).index
    assert len(index.inputs()) == 7  # ids, mask, positions and the 4 cache tensors
    with np.load(golden) as npz:  # plain NumPy reads it: every compared tensor, the inputs, the index
        assert len(npz.files) == len(saved["results"]) + 7 + 1
        assert npz["t0"].dtype == np.int64 and npz["t0"].shape == (3, 12)
    assert index.runner == "ort" and index.inputs()[0].name == "input_ids"
    assert all(t.tolerance is not None and t.tolerance.rtol == 1e-4 for t in index.compared())

    code, checked = run_json("compare", artifact, "--check-golden", golden)
    assert code == 0 and checked["runners"] == ["golden", "ort"]
    assert len(checked["results"]) == len(saved["results"])
    assert max(r["max_rel_err"] for r in checked["results"]) < 1e-6

    broken = corrupt_linear(artifact, CORRUPTED["tiny:llama"], tmp_path / "broken")
    result = run_cli("compare", broken, "--check-golden", golden)
    assert result.exit_code == 1
    assert_clean_failure(result, "(output of model.layers.1.mlp.down_proj)")


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:llama", "tiny:bert", "tiny:vit"])
def test_ci_golden(name: str, artifacts: dict[str, Path]) -> None:
    """The project's regression check of layer outputs (goldens from scripts/make_goldens.sh)."""
    golden = GOLDENS / f"{name.split(':')[1]}.npz"
    code, data = run_json("compare", artifacts[name], "--check-golden", golden)
    assert code == 0, data["first_breach"]
    assert data["marked"] >= 5 and len(data["results"]) > data["marked"]


def test_golden_bad_input(artifacts: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert_clean_failure(run_cli("compare", artifacts["tiny:llama"], "--check-golden", junk), "not an llm2trt golden")
    missing = tmp_path / "missing.npz"
    assert_clean_failure(run_cli("compare", artifacts["tiny:llama"], "--check-golden", missing), "no golden file")
    other = GOLDENS / "gpt2.npz"
    assert_clean_failure(run_cli("compare", artifacts["tiny:llama"], "--check-golden", other), "does not produce")
    both = run_cli("compare", artifacts["tiny:llama"], "--check-golden", other, "--mark", "all")
    assert_clean_failure(both, "drop --save-golden and --mark")
    assert_clean_failure(run_cli("compare", artifacts["tiny:llama"], "--mark", "("), "regular expression")
    assert_clean_failure(run_cli("compare", artifacts["tiny:llama"], "--mark", "nothing_here"), "matches no tensor")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w") as zf:
        zf.writestr("x.npy", b"")
    assert_clean_failure(
        run_cli("compare", artifacts["tiny:llama"], "--check-golden", tmp_path / "empty.npz"), "not an llm2trt golden"
    )


def test_failed_save_leaves_no_golden(artifacts: dict[str, Path], tmp_path: Path) -> None:
    golden = tmp_path / "g.npz"
    result = run_cli(
        "compare", artifacts["tiny:llama"], "--mark", "all", "--runners", "torch,trt", "--save-golden", golden
    )
    assert_clean_failure(result, "cannot run")
    assert not golden.exists() and not list(tmp_path.glob("*.partial"))


# -- tolerance profiles and rounds --------------------------------------------------------------


def test_tolerance_profiles() -> None:
    assert [profile_for(d).rtol for d in (DType.FP32, DType.FP16, DType.BF16)] == [1e-4, 1e-2, 5e-2]
    assert profile_for(DType.FP16, "int8-sq").min_cosine == 0.9
    assert all(PROFILES.get(q).min_cosine for q in ("fp8", "int4-awq", "int4-rtn", "int8-wo"))
    ref = np.linspace(-1, 1, 100)
    flipped = errors(-ref, ref)
    assert flipped.cosine == pytest.approx(-1.0) and flipped.max_rel_err == pytest.approx(2.0)
    noisy = errors(ref + 0.1, ref)
    policy = profile_for(DType.FP32, "int4-rtn")
    assert noisy.max_rel_err == pytest.approx(0.1) and policy.verdict(noisy.max_rel_err, 0.1, noisy.cosine)
    assert not policy.verdict(flipped.max_rel_err, 2.0, flipped.cosine)
    assert not profile_for(DType.FP32).verdict(noisy.max_rel_err, 0.1, noisy.cosine)


def test_rounds_follow_layers(artifacts: dict[str, Path]) -> None:
    graph_map = GraphMap.of(onnx.load(str(artifacts["tiny:llama"] / "model.onnx"), load_external_data=False))
    rounds = rounds_of(graph_map.marks)
    assert [r[0].layer for r in rounds] == [None, 0, 1, None]
    assert sum(len(r) for r in rounds) == len(graph_map.marks)
    assert [m.module for m in graph_map.layer_outputs()] == ["model.layers.0", "model.layers.1"]
