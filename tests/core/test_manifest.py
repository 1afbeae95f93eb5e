"""The manifest: several graphs per artifact, relative paths, and artifacts that move."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from llm2trt.core.dtypes import DType
from llm2trt.core.kv import KVLayout
from llm2trt.core.manifest import DimRange, GraphSpec, Manifest, TensorSpec
from tests.conftest import CC, assert_clean_failure, run_cli, run_json


def test_an_artifact_with_two_graphs_round_trips(artifacts: dict[str, Path], tmp_path: Path) -> None:
    manifest = Manifest.read(artifacts["tiny:llama"])
    kv = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, form="fixed")
    decoder = GraphSpec(
        "decoder_fixed",
        [TensorSpec("input_ids", DType.INT64, ["batch", "sequence"])],
        [TensorSpec("logits", DType.FP16, ["batch", "sequence", 1000])],
        "logits",
        {"batch": DimRange(1, 1, 4), "sequence": DimRange(1, 1, 64)},
        kv_cache=kv,
        onnx="fixed.onnx",
        external_data=["fixed.onnx.data"],
    )
    two = manifest.with_graph(decoder)
    out = tmp_path / "two"
    out.mkdir()
    two.write(out)
    back = Manifest.read(out)
    assert back == two and list(back.graphs) == ["decoder", "decoder_fixed"]
    fixed = back.graph("decoder_fixed")
    assert fixed.kv_cache == kv and fixed.inputs[0].dtype is DType.INT64
    # The contract's top-level keys (docs/contract.md) describe the default (first) graph.
    raw = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in raw["inputs"]][:4] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
    ]
    assert raw["kv_cache"]["form"] == "growing" and raw["graphs"]["decoder_fixed"]["kv_cache"]["form"] == "fixed"
    assert raw["graphs"]["decoder_fixed"]["kv_cache"]["past_names"][0] == "past_key_values.0.key"
    assert raw["dtype"] == "fp32" and raw["graphs"]["decoder_fixed"]["outputs"][0]["dtype"] == "fp16"
    # Paths are relative; each graph's file is resolved against the artifact.
    shutil.copy(artifacts["tiny:llama"] / "model.onnx", out / "fixed.onnx")
    shutil.copy(artifacts["tiny:llama"] / "model.onnx.data", out)  # its weights, where it says they are
    assert back.onnx_path(out, "decoder_fixed") == out / "fixed.onnx"
    shown = run_cli("inspect", out)  # the default graph's model.onnx is not there: the manifest still shows
    assert shown.exit_code == 0 and "graphs        decoder (model.onnx), decoder_fixed (fixed.onnx)" in shown.stdout


def test_artifacts_and_engine_directories_move(artifacts: dict[str, Path], tmp_path: Path) -> None:
    before = tmp_path / "before"
    shutil.copytree(artifacts["tiny:llama"], before / "onnx")
    assert run_cli("build", before / "onnx", "-o", before / "engine", *CC, "-q").exit_code == 0
    raw = json.loads((before / "engine" / "manifest.json").read_text())
    assert (
        raw["graphs"]["decoder"]["onnx"] == "../onnx/model.onnx"
        and raw["graphs"]["decoder"]["engine"] == "model.engine"
    )
    assert not any(str(tmp_path) in json.dumps(v) for k, v in raw.items() if k != "source")  # nothing absolute
    after = tmp_path / "elsewhere" / "after"
    after.parent.mkdir()
    before.rename(after)
    for directory in (after / "onnx", after / "engine"):
        code, result = run_json("compare", directory, "-q")
        assert code == 0 and result["passed"], directory
        code, view = run_json("inspect", directory)
        assert code == 0 and view["nodes"] > 100
    code, _ = run_json("build", after / "onnx", "-o", after / "engine2", *CC, "-q")
    assert code == 0
    # An engine directory moved away from its ONNX says where it looked.
    lone = tmp_path / "lone"
    (after / "engine").rename(lone)
    result = run_cli("compare", lone)
    assert_clean_failure(result, "the ONNX file of graph 'decoder' is missing: ../onnx/model.onnx", None)
    # And one whose ONNX changed since the build says so.
    (after / "engine").mkdir()
    shutil.copytree(lone, after / "engine", dirs_exist_ok=True)
    (after / "onnx" / "model.onnx").write_bytes((after / "onnx" / "model.onnx").read_bytes() + b"\0")
    assert_clean_failure(run_cli("compare", after / "engine"), "changed since the engine", None)


def test_old_manifests_are_refused_with_a_reason(artifacts: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(artifacts["tiny:vit"], old)
    data = json.loads((old / "manifest.json").read_text())
    del data["graphs"]
    data["llm2trt_version"] = "0.0.9"
    (old / "manifest.json").write_text(json.dumps(data))
    assert_clean_failure(run_cli("inspect", old), "written by llm2trt 0.0.9, before artifacts held several graphs")
    data = json.loads((artifacts["tiny:vit"] / "manifest.json").read_text())
    data["graphs"]["encoder"]["inputs"][0]["dtype"] = "complex64"
    (old / "manifest.json").write_text(json.dumps(data))
    assert_clean_failure(run_cli("inspect", old), "unknown dtype 'complex64'")
    assert replace(Manifest.read(artifacts["tiny:vit"])).dtype is DType.FP32


def test_weights_carry_their_sha256_and_verify(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """convert and optimize record each data file's sha256; inspect --verify (and build) check them."""
    import hashlib

    from tests.conftest import run_cli

    for name in ("tiny:llama", "tiny:gpt2"):
        graph = Manifest.read(artifacts[name]).graph()
        assert len(graph.external_data_sha256) == len(graph.external_data) >= 1
        data = artifacts[name] / graph.external_data[0]
        digest = hashlib.sha256(data.name.encode() + b"\0" + data.read_bytes()).hexdigest()
        assert graph.external_data_sha256[0] == digest
    result = run_cli("inspect", artifacts["tiny:llama"], "--verify")
    assert result.exit_code == 0
    assert "weights verified: 1 file(s)" in result.stdout
