"""Int4GroupGemm: the op's reference body in ONNX Runtime against NumPy, the rewrite from INT4 Q/DQ,
the build with TensorRT-RTX (body inlined, said so), the kernel compiled ahead of time for
TensorRT's plugin ABI, `llm2trt plugins`, and the build features that go with plugins.

The kernel itself runs in tests/test_plugin_kernel_gpu.py (`pytest -m gpu`, on a CUDA GPU)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from llm2trt.build.driver import ProgressBar
from llm2trt.core.manifest import Manifest
from llm2trt.plugins import PLUGINS, find
from llm2trt.plugins.int4_gemm import NAME, function, make_node, pack, reference, unpack
from tests.conftest import BACKEND, CC, assert_clean_failure, run_cli, run_json


def _op_model(n: int, k: int, group: int, dtype: type, rng: np.random.Generator) -> tuple[bytes, Any, Any]:
    q = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
    w = pack(q)
    s = (rng.random((n, k // group)) * 0.05 + 0.01).astype(dtype)
    x = gs.Variable("x", dtype=dtype, shape=["batch", "rows", k])
    y = gs.Variable("y", dtype=dtype, shape=["batch", "rows", n])
    node = make_node(x, gs.Constant("w", w), gs.Constant("s", s), group, y, "op")
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21, functions=[function(21)])
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString(), w, s


def test_pack_round_trips_every_nibble() -> None:
    q = np.array([[-8, 7, -1, 0, 3, -5, 6, -7], [1, 2, -3, -4, 5, -6, 7, -8]], dtype=np.int8)
    packed = pack(q)
    assert packed.dtype == np.int8 and packed.shape == (2, 4)
    assert (unpack(packed) == q).all()
    assert packed[0, 0].view(np.uint8) == 0x78  # -8 low nibble (0x8), 7 high nibble (0x7)


@pytest.mark.parametrize(("dtype", "tol"), [(np.float32, 1e-6), (np.float16, 2e-3)])
@pytest.mark.parametrize(("n", "k", "group"), [(40, 64, 16), (24, 256, 128), (7, 96, 32)])
def test_reference_body_in_onnx_runtime_matches_numpy(n: int, k: int, group: int, dtype: type, tol: float) -> None:
    rng = np.random.default_rng(n + k)
    model, w, s = _op_model(n, k, group, dtype, rng)
    x = rng.standard_normal((2, 5, k)).astype(dtype)
    (got,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = reference(x.astype(np.float64), w, s.astype(np.float64), group)
    err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    assert got.shape == (2, 5, n) and err <= tol, err


@pytest.fixture(scope="module")
def int4_artifacts(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny:llama quantized int4-rtn (group 16), without and with the plugin rewrite."""
    root = tmp_path_factory.mktemp("int4")
    plain, plugged = root / "q4", root / "plugin"
    common = ["--quant", "int4-rtn", "--group-size", "16", "-q"]
    assert run_cli("optimize", artifacts["tiny:llama"], "-o", plain, *common).exit_code == 0
    code, info = run_json("optimize", artifacts["tiny:llama"], "-o", plugged, *common, "--plugin", NAME)
    assert code == 0, info
    return plain, plugged


def _feeds(manifest: Manifest, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sizes = {"batch": 2, "sequence": 5, "past_sequence": 3, "total_sequence": 8}
    feeds = {}
    for spec in manifest.graph().inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 100, shape).astype(np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(3, 8), shape).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_rewrite_gives_the_quantized_graph_s_outputs(int4_artifacts: tuple[Path, Path]) -> None:
    plain, plugged = int4_artifacts
    manifest = Manifest.read(plugged)
    counts = manifest.graph().op_counts
    assert counts.get(f"llm2trt.{NAME}") == 14 and "DequantizeLinear" not in counts  # every int4 linear layer
    record = next(p for p in manifest.passes if p.name == "plugin_int4groupgemm")
    assert record.counts == {"int4_matmul_to_plugin": 14}
    model = onnx.load(str(plugged / "model.onnx"), load_external_data=False)
    assert [(f.domain, f.name) for f in model.functions] == [("llm2trt", NAME)]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("llm2trt", 1)}
    feeds = _feeds(manifest, np.random.default_rng(0))
    # Unoptimized: ONNX Runtime would turn the plain graph's DequantizeLinear -> MatMul into its
    # MatMulNBits, which rounds activations too; the plugin body must equal the dequantized math.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(plain / "model.onnx"), options).run(None, feeds)
    got = ort.InferenceSession(str(plugged / "model.onnx"), options).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1.0)


def test_plugin_graph_builds_with_the_body_inlined(int4_artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "engine"
    code, info = run_json("build", int4_artifacts[1], "-o", out, *CC, "-q")
    assert code == 0, info  # the process did not abort
    [status] = [p for p in info["plugins"] if p["name"] == NAME]
    assert status["nodes"] == 14 and status["domain"] == "llm2trt" and status["version"] == 1
    if BACKEND.supports("plugins"):
        assert status["status"] == "registered"
    else:
        assert status["status"] == "inlined" and "cannot host plugin layers" in status["reason"]
        # The body's DequantizeLinear on the packed bytes, one per inlined call.
        assert info["layer_types"]["DEQUANTIZE"] == 14 and info["matmul_precisions"] == {"fp32 x fp32": 15}
    assert info["profile_names"] == ["prefill", "decode"] and len(info["optimization_profiles"]) == 2
    assert json.loads((out / "build.json").read_text())["plugins"] == info["plugins"]
    text = run_cli("build", int4_artifacts[1], "-o", tmp_path / "again", *CC).stdout
    assert f"plugin llm2trt::{NAME} (14 nodes)" in text


@pytest.mark.parametrize("gemv", [True, False])
def test_kernel_compiles_ahead_of_time_for_the_plugin_abi(gemv: bool) -> None:
    from llm2trt.core.dtypes import DType
    from llm2trt.plugins.int4_gemm_kernel import Tile, compile_ptx

    tile = Tile(1, 4, 1024, 2, 3, gemv=True) if gemv else Tile(16, 64, 128, 8, 3)
    compiled = compile_ptx(DType.BF16, 128, tile, arch=89)  # no GPU: Triton compiles for a named arch
    entry = compiled.ptx[compiled.ptx.index(".entry") :]
    params = re.findall(r"\.param \.(u64|u32)", entry[: entry.index(")")])
    # TensorRT's AOT ABI: input pointers, int32 scalars (M, N, K), the output pointer; Triton's
    # hidden scratch pointers after them get null (compile_ptx refused any scratch use).
    assert params[:7] == ["u64"] * 3 + ["u32"] * 3 + ["u64"]
    assert compiled.threads == tile.num_warps * 32 and ".target sm_89" in compiled.ptx


def test_plugins_command_lists_the_op() -> None:
    code, info = run_json("plugins")
    assert code == 0
    [entry] = [p for p in info["plugins"] if p["name"] == NAME]
    assert (entry["domain"], entry["version"], entry["tensorrt_plugin"]) == ("llm2trt", 1, "llm2trt::Int4GroupGemm")
    assert entry["kernel_available"] is False  # no GPU here
    assert find(NAME) is PLUGINS.get(NAME)


def test_plugin_refusals(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--plugin", "Nope")
    assert_clean_failure(result, "unknown plugin 'Nope'; this install has: Int4GroupGemm", out)
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--plugin", NAME)
    assert_clean_failure(result, "nothing in the graph matches its pattern: it rewrites MatMuls whose weight", out)


def test_full_tensorrt_features_refused_or_absent(artifacts: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    assert run_cli("build", artifacts["tiny:bert"], "-o", engine, *CC, "-q").exit_code == 0
    before = (engine / "model.engine").read_bytes()
    result = run_cli("refit", engine, "--weights", artifacts["tiny:bert"])
    if BACKEND.supports("refit"):
        assert_clean_failure(result, "holds its weights already (build it with --strip-weights)")
    else:
        assert_clean_failure(result, "refitting engines need full TensorRT; this build uses TensorRT-RTX")
    assert (engine / "model.engine").read_bytes() == before  # nothing touched
    # Full TensorRT's plugin registration without TensorRT: an import error naming it, no crash.
    if not BACKEND.supports("plugins"):
        from llm2trt.plugins import int4_gemm_trt

        with pytest.raises(ImportError, match="tensorrt"):
            int4_gemm_trt.register.__wrapped__()


def test_named_profiles_and_optimization_level(artifacts: dict[str, Path], tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(
        json.dumps(
            {
                "profiles": [
                    {"name": "short", "dims": {"sequence": "1:16:32", "batch": "1:1:2"}},
                    {"name": "long", "dims": {"sequence": "32:64:128"}},
                ]
            }
        )
    )
    args = ["build", artifacts["tiny:bert"], "-o", tmp_path / "e", *CC, "--profiles", profiles, "--opt-level", "0"]
    code, info = run_json(*args, "-q")
    assert code == 0, info
    assert info["profile_names"] == ["short", "long"] and info["optimization_level"] == 0
    short, long = info["optimization_profiles"]
    assert short["input_ids"] == {"min": [1, 1], "opt": [1, 16], "max": [2, 32]}
    assert long["input_ids"]["min"][1] == 32 and long["input_ids"]["max"][1] == 128
    code, info = run_json("build", artifacts["tiny:llama"], "-o", tmp_path / "kv", *CC, "--profiles", profiles, "-q")
    assert code == 0 and info["profile_names"] == ["short.prefill", "short.decode", "long.prefill", "long.decode"]
    bad = tmp_path / "bad.json"
    for text, fragment in [
        ("{", "cannot read it as JSON"),
        ('{"profiles": []}', 'expected {"profiles"'),
        ('{"profiles": [{"name": "a", "dims": {"nope": "1:2:3"}}]}', "unknown dims ['nope']"),
        ('{"profiles": [{"name": "a", "dims": {"sequence": "9:2:3"}}]}', "invalid dim range 9:2:3"),
    ]:
        bad.write_text(text)
        result = run_cli("build", artifacts["tiny:bert"], "-o", tmp_path / "x", *CC, "--profiles", bad)
        assert_clean_failure(result, fragment, tmp_path / "x")
    result = run_cli("build", artifacts["tiny:bert"], "-o", tmp_path / "x", *CC, "--opt-level", "6")
    assert_clean_failure(result, "--opt-level 6: TensorRT's builder optimization levels are 0 to 5", tmp_path / "x")


def test_progress_bar_draws_tensorrt_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = ProgressBar(enabled=True)
    bar.update("0 6 Building engine")
    bar.update("3 6 Building engine")
    bar.close()
    ProgressBar(enabled=False).update("1 2 hidden")
    text = err.getvalue()
    assert "[------------------------] 0/6 Building engine" in text
    assert "[############------------] 3/6" in text and text.endswith("\n") and "hidden" not in text
