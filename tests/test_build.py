"""Engine builds: real engines with whatever TensorRT is installed (TensorRT-RTX ahead of time for
its default target, or full TensorRT for the local GPU). Tests ask the adapter what the backend can
do instead of assuming one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2trt.backends.tensorrt.adapter import Backend, gpu_visible
from llm2trt.core.manifest import Manifest
from llm2trt.exporters import get_spec
from tests.conftest import BACKEND, CC, TINY, assert_clean_failure, graph_artifact, run_cli, run_json


@pytest.mark.parametrize("name", TINY)
def test_build_writes_engine_and_build_json(name: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, info = run_json("build", artifacts[name], "-o", out, *CC, "-q")
    assert code == 0, info
    engine = out / "model.engine"
    assert engine.stat().st_size == info["engine_bytes"] > 100_000
    on_disk = json.loads((out / "build.json").read_text())
    assert on_disk["backend"] == BACKEND.name
    assert on_disk["compute_capability"] == (BACKEND.aot_target or "current-gpu")
    assert on_disk["precision"] == "fp32" and on_disk["strongly_typed"] is True
    assert on_disk["network_layers"] > 50
    # A mixture of experts' MoE nodes are plugin nodes that TensorRT-RTX inlines (their reference body).
    assert all(p["nodes"] == 0 or (p["name"], p["status"]) == ("MoE", "inlined") for p in on_disk["plugins"])
    assert on_disk["timing_cache"] is None
    assert on_disk["build_seconds"] > 0
    profile = on_disk["optimization_profiles"][0]
    manifest = Manifest.read(artifacts[name])
    assert set(profile) == {t.name for t in manifest.inputs}
    # The engine directory carries the manifest forward with the build recorded.
    built = Manifest.read(out)
    assert built.passes[-1].name == "tensorrt_build"
    assert built.passes[-1].counts["network_layers"] == on_disk["network_layers"]


def test_profile_override_reaches_the_engine(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, info = run_json(
        "build",
        artifacts["tiny:llama"],
        "-o",
        out,
        *CC,
        "--profile",
        "sequence=4:32:64",
        "--profile",
        "batch=2",
        "-q",
    )
    assert code == 0, info
    assert info["optimization_profiles"][0]["input_ids"] == {"min": [2, 4], "opt": [2, 32], "max": [2, 64]}
    assert info["dims"]["batch"] == {"min": 2, "opt": 2, "max": 2}
    assert info["dims"]["sequence"] == {"min": 4, "opt": 32, "max": 64}  # (and the cache's dims: a KV graph)


def test_default_profile_is_capped_by_the_position_limit(artifacts: dict[str, Path]) -> None:
    dims = Manifest.read(artifacts["tiny:gpt2"]).dynamic_dims
    assert (dims["sequence"].min, dims["sequence"].opt, dims["sequence"].max) == (1, 128, 256)
    assert "sequence" not in Manifest.read(artifacts["tiny:vit"]).dynamic_dims


def test_full_tensorrt_features_are_refused_cleanly_where_missing(artifacts: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache.bin"
    out = tmp_path / "engine"
    args = ["build", artifacts["tiny:bert"], "-o", out, *CC]
    if BACKEND.supports("timing_cache"):  # full TensorRT: the cache is written, then hit
        code, first = run_json(*args, "--timing-cache", cache, "-q")
        assert code == 0 and cache.stat().st_size > 0 and first["timing_cache"]["hit"] is False
        code, second = run_json(*args, "--timing-cache", cache, "--force", "-q")
        assert code == 0 and second["timing_cache"]["hit"] is True
    else:  # TensorRT-RTX: measured to be no-ops or internal errors, refused before any work
        result = run_cli(*args, "--timing-cache", cache)
        assert_clean_failure(result, "timing caches (--timing-cache) need full TensorRT", out)
        assert not cache.exists()
    if BACKEND.supports("strip_weights"):
        code, info = run_json(*args, "--strip-weights", "--force", "-q")
        assert code == 0 and info["strip_weights"] is True
    else:
        result = run_cli(*args, "--strip-weights")
        assert_clean_failure(result, "weight-stripped engines (--strip-weights) need full TensorRT", out)


def test_no_gpu_needs_a_compute_capability(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "engine"
    result = run_cli("build", artifacts["tiny:bert"], "-o", out)
    fragment = "pass --compute-capability" if BACKEND.supports("compute_capability") else "builds for the GPU it runs"
    assert_clean_failure(result, f"no GPU here to build for: {fragment}", out)


def test_full_tensorrt_refuses_compute_capability() -> None:
    from llm2trt.backends.tensorrt.adapter import resolve_compute_capability
    from llm2trt.core.errors import InputError

    full = Backend("tensorrt", "10.x", object())
    assert full.supports("timing_cache") and full.supports("strip_weights") and not full.supports("compute_capability")
    assert full.aot_target is None
    with pytest.raises(InputError, match="full TensorRT builds for the GPU it runs on"):
        resolve_compute_capability(full, "sm89")
    if gpu_visible():
        assert resolve_compute_capability(full, None) is None


def test_trt_runner_runs_where_the_backend_can(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engine"
    assert run_cli("build", artifacts["tiny:vit"], "-o", out, *CC, "-q").exit_code == 0
    result = run_cli("compare", out, "--runners", "torch,trt")
    reason = BACKEND.cannot_run_engines()
    if reason is None:  # a GPU this backend runs on: the engine matches PyTorch
        assert result.exit_code == 0, result.stderr
    else:  # here: no GPU (or one TensorRT-RTX refuses, like sm90)
        assert_clean_failure(result, f"cannot run a {BACKEND.display} engine here: {reason}", None)


def test_every_fp32_attention_is_built(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """Twelve fp32 Attention nodes: each needs marking decomposable, or the build fails."""
    from onnx import TensorProto, helper

    shape = [1, 4, 16, 32]
    # Side by side and summed. (Seen: one Attention's output feeding the next one's query, directly
    # or through a MatMul, segfaults TensorRT-RTX 1.7's fp32 build; so does one tensor as q, k and v.)
    nodes = [helper.make_node("Attention", ["x", "k", "v"], ["a0"], name="attn0", scale=0.125)]
    prev = "a0"
    for i in range(1, 12):
        nodes.append(helper.make_node("Attention", ["x", "k", "v"], [f"a{i}"], name=f"attn{i}", scale=0.125 + i / 100))
        nodes.append(helper.make_node("Add", [prev, f"a{i}"], [f"s{i}"], name=f"add{i}"))
        prev = f"s{i}"
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "k", "v")]
    graph = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    artifact = graph_artifact(artifacts["tiny:vit"], tmp_path / "attn", model)
    code, info = run_json("build", artifact, "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["attention_ops"] == 12


def test_polygraphy_builds_fused_fp32_attention_with_the_documented_hook(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """What `inspect` and the README tell a user who builds with Polygraphy instead of llm2trt."""
    import os
    import subprocess
    import sys

    fused = tmp_path / "opt"
    assert run_cli("optimize", artifacts["tiny:llama"], "-o", fused, "-q").exit_code == 0
    code, view = run_json("inspect", fused)
    assert code == 0 and any("--trt-network-postprocess-script" in note for note in view["notes"])
    hook = subprocess.run(
        [sys.executable, "-m", "llm2trt.build.worker", "--hook"], capture_output=True, text=True, check=True
    ).stdout.strip()
    polygraphy = Path(sys.executable).parent / "polygraphy"
    shapes = []
    for which, (batch, seq) in (("min", (1, 1)), ("opt", (1, 64)), ("max", (4, 128))):
        shapes += [f"--trt-{which}-shapes"] + [
            f"{n}:[{batch},{seq}]" for n in ("input_ids", "attention_mask", "position_ids")
        ]
    target = (
        ["--compute-capabilities", f"{BACKEND.aot_target[2]}.{BACKEND.aot_target[3:]}"] if BACKEND.aot_target else []
    )
    cmd = [str(polygraphy), "convert", str(fused / "model.onnx"), "--convert-to", "trt", "-o", str(tmp_path / "e")]
    env = {**os.environ, **BACKEND.polygraphy_env()}
    plain = subprocess.run([*cmd, *target, *shapes], capture_output=True, text=True, env=env, check=False)
    hooked = subprocess.run(
        [*cmd, *target, *shapes, "--trt-network-postprocess-script", hook],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert hooked.returncode == 0, hooked.stdout[-2000:]
    assert (tmp_path / "e").stat().st_size > 100_000
    if BACKEND.is_rtx and BACKEND.version.startswith("1.7."):  # measured: without the hook the build fails
        assert plain.returncode != 0 and "not supported by a dedicated kernel" in plain.stdout + plain.stderr


def _forms_of(name: str) -> tuple[str, ...]:
    spec = get_spec(name[5:])
    return spec.kv_forms_for(spec.make_tiny_config())


DECODERS = ["tiny:gpt2", "tiny:llama", "tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom"]
ENGINE_CASES = [(name, form) for name in DECODERS for form in ("growing", "fixed") if form in _forms_of(name)]


@pytest.mark.parametrize(("name", "form"), ENGINE_CASES)
def test_decoder_engines_have_prefill_and_decode_profiles(
    name: str, form: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "fused"
    args = ["--kv-form", "fixed"] if form == "fixed" else []
    assert run_cli("optimize", artifacts[name], "-o", source, *args, "-q").exit_code == 0
    code, info = run_json("build", source, "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["profile_names"] == ["prefill", "decode"] and len(info["optimization_profiles"]) == 2
    prefill, decode = info["optimization_profiles"]
    shapes = [shape for profile in (prefill, decode) for io in profile.values() for shape in io.values()]
    assert all(dim >= 1 for shape in shapes for dim in shape)  # TensorRT rejects zero-length dims
    limit = 1024 if name == "tiny:bloom" else 256  # the tiny configs' positions; ALiBi states none
    assert prefill["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [8, limit]}
    assert decode["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [8, 1]}
    cache = prefill["past_key_values.0.key"]
    kv = Manifest.read(source).graph().kv_cache
    assert kv is not None
    if form == "growing":  # the prefill's past is one masked dummy slot; decode grows to the limit
        assert cache["max"][2] == 1 and decode["past_key_values.0.key"]["max"][2] == limit
        assert "attention_mask" in prefill
    else:  # a buffer of the model's 256 positions, static (TensorRT's KV_CACHE_UPDATE wants it so)
        shape = [kv.num_kv_heads, 256, kv.head_dim]  # Llama's GQA caches hold its 2 KV heads
        assert cache == decode["past_key_values.0.key"] == {k: [8 if k == "max" else 1, *shape] for k in cache}
        assert info["static_dims"] == {"cache_sequence": 256}
        assert "attention_mask" not in prefill and info["layer_types"].get("KV_CACHE_UPDATE", 0) == 2 * kv.num_layers
    assert info["attention_ops"] == kv.num_layers and info["network_layers"] > 50


@pytest.fixture(scope="module")
def llama_engine(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-engine") / "engine"
    result = run_cli("build", artifacts["tiny:llama"], "-o", out, *CC, "-q")
    assert result.exit_code == 0, result.stderr
    return out


def test_generate_on_an_engine_directory_runs_the_engine(llama_engine: Path) -> None:
    """An engine directory's runner is its engine: where engines cannot run, one line says why and
    how to run the ONNX graph instead, never a quiet fallback to ONNX Runtime."""
    result = run_cli("generate", llama_engine, "--ids", "1,2,3", "--max-new-tokens", "2")
    reason = BACKEND.cannot_run_engines()
    if reason is None:  # a GPU this backend runs on
        assert result.exit_code == 0, result.stderr
        code, data = run_json("generate", llama_engine, "--ids", "1,2,3", "--max-new-tokens", "2", "-q")
        assert code == 0 and data["runner"] == "trt"
    else:
        assert_clean_failure(result, f"cannot run a {BACKEND.display} engine here: {reason}")
        error = next(line for line in result.stderr.splitlines() if line.startswith("llm2trt: error:"))
        assert "--runner ort runs the ONNX graph the engine was built from" in error


def test_generate_runner_ort_on_an_engine_directory_says_the_engine_is_unused(llama_engine: Path) -> None:
    result = run_cli("generate", llama_engine, "--ids", "1,2,3", "--max-new-tokens", "2", "--runner", "ort", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["runner"] == "ort"
    notes = [line for line in result.stderr.splitlines() if "is not used" in line]
    assert len(notes) == 1 and notes[0].startswith("[llm2trt] "), result.stderr
    assert "model.engine" in notes[0] and "ONNX graph" in notes[0]
    quiet = run_cli("generate", llama_engine, "--ids", "1,2,3", "--max-new-tokens", "2", "--runner", "ort", "-q")
    assert quiet.exit_code == 0 and "is not used" in quiet.stderr  # a warning: shown under -q too


def test_build_prints_its_phases_when_stderr_is_not_a_terminal(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """No terminal, no progress bar: a log file still shows what the build is doing."""
    result = run_cli("build", artifacts["tiny:vit"], "-o", tmp_path / "engine", *CC)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("[llm2trt] TensorRT: parsing ") for line in lines), result.stderr
    assert any(line.startswith("[llm2trt] TensorRT: building ") for line in lines), result.stderr
    assert any(line.startswith("[llm2trt] TensorRT: ") and line.endswith(": done") for line in lines)  # its phases
    assert not any("\r" in line for line in lines)  # no bar redrawn in place
    quiet = run_cli("build", artifacts["tiny:vit"], "-o", tmp_path / "quiet", *CC, "-q")
    assert quiet.exit_code == 0 and "TensorRT: " not in quiet.stderr
