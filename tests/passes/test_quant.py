"""optimize --quant on tiny:llama and tiny:gpt2: Q/DQ placement (op counts), scales against NumPy
arithmetic written here, calibration against PyTorch, and ONNX Runtime against a fake-quantized
PyTorch model; the NumPy reference functions and AWQ's search on their own; TensorRT-RTX builds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.tolerance import errors
from llm2trt.passes import quant_math as q
from llm2trt.passes.qdq import unfused_qdq
from llm2trt.passes.quant_methods import METHODS, QuantMethod
from tests.conftest import CC, assert_clean_failure, run_cli
from tests.fake_quant import GROUPS, PREFIX, fake_quantize, migrate, weight_in_out

CALIB = Path(__file__).resolve().parents[1] / "data" / "text" / "calib.txt"
SAMPLES, GROUP = 4, 16
MODELS = ("tiny:llama", "tiny:gpt2")
# Every method places its Q/DQ on these too (optimize's own numeric check holds each within the
# method's tolerance); the PyTorch fake-quantization references cover MODELS.
PLACED = (*MODELS, "tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom")
# Linear layers per model (lm_head kept) and the inputs they read (one activation Q/DQ each): two
# layers of q, k, v, o, gate, up, down (Phi-3 and BLOOM pack q/k/v and gate/up; GPT-2 too).
LINEARS = {"tiny:llama": 14, "tiny:gpt2": 8, "tiny:qwen3": 14, "tiny:gemma3": 14, "tiny:phi3": 8, "tiny:bloom": 8}
INPUTS = dict.fromkeys(PLACED, 8)


def method_args(method: str) -> list[str]:
    spec = METHODS.get(method)
    args = ["--quant", method, "--group-size", str(GROUP)]
    return args + (["--calib", str(CALIB), "--calib-samples", str(SAMPLES)] if spec.needs_calibration else [])


@pytest.fixture(scope="module")
def quantized(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    made: dict[tuple[str, str], Path] = {}

    def get(model: str, method: str) -> Path:
        if (model, method) not in made:
            out = tmp_path_factory.mktemp("quant") / f"{model[5:]}-{method}"
            result = run_cli("optimize", artifacts[model], "-o", out, *method_args(method), "-q")
            assert result.exit_code == 0, result.stderr
            made[model, method] = out
        return made[model, method]

    return get


def graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path / "model.onnx"))


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def module_dq(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """module -> the DequantizeLinear of its weight (named after the MatMul it feeds)."""
    return {n.name.split("/")[-2]: n for n in proto.graph.node if n.name.endswith("_weight_dq")}


def weight_dqs(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Full module name (model.layers.0.self_attn.q_proj) -> its weight's DequantizeLinear."""
    from llm2trt.passes.pattern import module_of

    return {module_of(n.name): n for n in proto.graph.node if n.name.endswith("_weight_dq")}


# -- the NumPy reference, against arithmetic written out here ------------------------------------


def test_weight_scales_and_codes_match_plain_arithmetic() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    int8, int4, fp8 = (METHODS.get(m) for m in ("int8-wo", "int4-rtn", "fp8"))
    for j in range(24):  # per output channel: max |column| / 127, round half to even, clip
        scale = np.abs(w[:, j]).max() / 127
        assert q.weight_scale(w, int8, GROUP)[j] == pytest.approx(scale, rel=1e-6)
        codes = q.quantize_weight(w, q.weight_scale(w, int8, GROUP), int8, GROUP)[:, j]
        assert np.array_equal(codes, np.clip(np.round(w[:, j] / np.float32(scale)), -128, 127).astype(np.int8))
    blocks = q.weight_scale(w, int4, GROUP)
    assert blocks.shape == (64 // GROUP, 24)
    for b in range(64 // GROUP):  # blocks of GROUP input channels: max |block| / 7, codes in [-8, 7]
        block = w[b * GROUP : (b + 1) * GROUP]
        assert np.allclose(blocks[b], np.abs(block).max(axis=0) / 7, rtol=1e-6)
    codes = q.quantize_weight(w, blocks, int4, GROUP)
    assert codes.dtype == ml_dtypes.int4 and codes.astype(np.int8).min() >= -8 and codes.astype(np.int8).max() <= 7
    assert np.allclose(q.weight_scale(w, fp8, GROUP), np.abs(w).max(axis=0) / 448, rtol=1e-6)
    # Dequantized weights are within half a step of the originals.
    for method in (int8, int4):
        scale = q.weight_scale(w, method, GROUP)
        step = np.repeat(scale, GROUP, axis=0) if method.blockwise else scale[None, :]
        assert np.all(np.abs(q.fake_quant_weight(w, method, GROUP) - w) <= step / 2 + 1e-7)


def test_smooth_scale_and_activation_statistics() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 50, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    stats = q.ActStats(8, rows=16, seed=0)
    for chunk in x:
        stats.update(chunk)
    flat = x.reshape(-1, 8)
    assert np.array_equal(stats.amax, np.abs(flat).max(axis=0))
    assert np.allclose(stats.mean_abs, np.abs(flat).mean(axis=0), rtol=1e-6)
    assert stats.tokens == 150 and stats.sample.shape == (16 + 2, 8)  # uniform rows + the 2 heaviest
    assert all(any(np.array_equal(row, f) for f in flat) for row in stats.sample)  # real tokens, bounded
    heaviest = np.sort(np.abs(flat).max(axis=1))[-2:]
    assert np.array_equal(np.sort(np.abs(stats.sample[-2:]).max(axis=1)), heaviest)
    weights = [rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)]
    w_amax = np.maximum(np.abs(weights[0]).max(axis=1), np.abs(weights[1]).max(axis=1))
    s = q.smooth_scale(stats.amax, weights, 0.5)
    assert np.allclose(s, np.sqrt(stats.amax) / np.sqrt(w_amax), rtol=1e-5)


def test_awq_search_never_loses_to_rounding_and_helps_outlier_channels() -> None:
    rng = np.random.default_rng(2)
    int4 = METHODS.get("int4-awq")
    x = rng.normal(size=(128, 64)).astype(np.float32)
    x[:, 5] *= 40.0  # a salient input channel, as in real LLM activations
    w = rng.normal(size=(64, 32)).astype(np.float32)
    s, alpha, ratio = q.awq_scale(x, np.abs(x).mean(axis=0), [w], int4, GROUP)
    rtn = float(np.square(x @ (q.fake_quant_weight(w, int4, GROUP) - w)).sum())
    awq = float(np.square((x / s) @ q.fake_quant_weight(w * s[:, None], int4, GROUP) - x @ w).sum())
    assert alpha > 0 and ratio < 0.8 and awq == pytest.approx(ratio * rtn, rel=1e-3)
    clip = q.awq_clip(x / s, w * s[:, None], int4, GROUP)
    assert clip.shape == (64 // GROUP, 32) and clip.min() >= 0.5 and clip.max() <= 1.0
    clipped = q.fake_quant_weight(w * s[:, None], int4, GROUP, clip)
    assert float(np.square((x / s) @ clipped - x @ w).sum()) <= awq * (1 + 1e-6)


def test_the_searches_fast_rounding_is_the_two_step_rounding_bit_for_bit() -> None:
    """fake_quant_weight's one-buffer path for integer blocks against quantize then dequantize."""
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(256, 48)) * 0.02).astype(np.float16)
    w[:GROUP, 0] = 0  # an all-zero block: scale 1
    clip = rng.uniform(0.5, 1.0, size=(256 // GROUP, 48)).astype(np.float32)
    cases = [("int4-awq", GROUP, None), ("int4-awq", GROUP, clip), ("int4-rtn", 128, None), ("int8-wo", 0, None)]
    for name, group, c in cases:  # int8-wo: per channel, the general path
        method = METHODS.get(name)
        scale = q.weight_scale(w, method, group, c)
        slow = q.dequantize_weight(q.quantize_weight(w, scale, method, group), scale, method, group)
        assert np.array_equal(q.fake_quant_weight(w, method, group, c), slow), (name, group)


def test_awqs_exponent_search_scores_a_sample_of_a_wide_layers_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past AWQ_SCALE_COLUMNS output channels the search scores a fixed sample of them: exactly the
    search on those channels alone, which still finds the salient input channel."""
    rng = np.random.default_rng(4)
    int4 = METHODS.get("int4-awq")
    x = rng.normal(size=(64, 64)).astype(np.float32)
    x[:, 7] *= 30.0
    w = rng.normal(size=(64, 96)).astype(np.float32)
    monkeypatch.setattr(q, "AWQ_SCALE_COLUMNS", 40)
    sampled = q._some_columns(w)
    assert sampled.shape == (64, 40) and all(any(np.array_equal(c, o) for o in w.T) for c in sampled.T)
    part = q.awq_scale(x, np.abs(x).mean(axis=0), [w], int4, GROUP)
    alone = q.awq_scale(x, np.abs(x).mean(axis=0), [sampled], int4, GROUP)
    assert part[1] > 0 and part[2] < 0.8 and part[1:] == alone[1:]
    narrow = w[:, :40]
    assert q._some_columns(narrow) is narrow  # at the limit: every channel


# -- graphs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", PLACED)
@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS.get(m).mixed])  # auto: test_quant_auto.py
def test_qdq_placement(quantized: Any, model: str, method: str) -> None:
    spec = METHODS.get(method)
    path = quantized(model, method)
    proto = graph(path)
    ops = Counter(n.op_type for n in proto.graph.node)
    acts = INPUTS[model] if spec.activations is not None else 0
    assert ops["DequantizeLinear"] == LINEARS[model] + acts
    assert ops["QuantizeLinear"] == acts
    assert unfused_qdq(proto) == []  # every DQ feeds a MatMul, every Q a DQ
    inits = initializers(proto)
    for node in weight_dqs(proto).values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = inits[node.input[0]]
        assert DType.parse(weight.dtype) is spec.weights
        assert attrs == ({"axis": 0, "block_size": GROUP} if spec.blockwise else {"axis": 1})
    lm_head = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    producers = {out: n for n in proto.graph.node for out in n.output}
    weight_name = lm_head.input[1]
    if weight_name in producers:  # a tied embedding, written once: lm_head reads its transpose
        assert producers[weight_name].op_type == "Transpose"
        weight_name = producers[weight_name].input[0]
    assert inits[weight_name].dtype == np.float32  # kept
    manifest = json.loads((path / "manifest.json").read_text())["quantization"]
    assert manifest["method"] == method and len(manifest["quantized"]) == LINEARS[model]
    assert manifest["kept"] == {"lm_head": "kept in high precision (--keep lm_head)"}
    assert manifest["granularity"] == spec.granularity
    assert (manifest["calibration"] is not None) == spec.needs_calibration
    if spec.needs_calibration:
        assert manifest["calibration"]["samples"] == SAMPLES and manifest["calibration"]["text"] == CALIB.name


# -- numerics against PyTorch ------------------------------------------------------------------------


def calibration_ids(vocab: int, sequence: int) -> list[list[int]]:
    """What the calibrator feeds a model without a tokenizer: the text's bytes, in windows."""
    ids = [b % vocab for b in CALIB.read_bytes().decode("utf-8").encode("utf-8")]
    return [ids[i : i + sequence] for i in range(0, len(ids), sequence)][:SAMPLES]


def torch_stats(model: torch.nn.Module, modules: list[str], windows: list[list[int]]) -> dict[str, np.ndarray]:
    """Per-input-channel max |x| of each module's input over the calibration windows, in PyTorch."""
    amax: dict[str, np.ndarray] = {}

    def hook(name: str) -> Any:
        def record(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).numpy()
            amax[name] = np.maximum(amax.get(name, a), a)

        return record

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]))
    for h in handles:
        h.remove()
    return amax


def fake_quantized(model_name: str, method: QuantMethod, searched: Any) -> tuple[Any, Any, list[float]]:
    """The torch model, and a copy fake-quantized the way the method says: SmoothQuant migration (at
    the strengths and activation clipping the manifest records as searched), weights through the
    NumPy reference, static per-tensor activation Q/DQ from PyTorch's own calibration. Returns both
    and the activation scales."""
    source = resolve_model(model_name)
    reference, model = source.load(), source.load()
    layers = int(getattr(source.config, "num_hidden_layers", getattr(source.config, "n_layer", 0)))
    sequence = min(
        512, int(getattr(source.config, "max_position_embeddings", getattr(source.config, "n_positions", 512)))
    )
    windows = calibration_ids(int(source.config.vocab_size), sequence)
    arch = model_name.split(":")[1]
    names = [f"{PREFIX[arch]}.{i}.{m}" for i in range(layers) for group, _ in GROUPS[arch] for m in group]
    amax = torch_stats(model, names, windows)
    scales: list[float] = []
    with torch.no_grad():
        for i in range(layers):
            base = f"{PREFIX[arch]}.{i}"
            for group, folds in GROUPS[arch]:
                mods = [model.get_submodule(f"{base}.{m}") for m in group]
                first = f"{base}.{group[0]}"
                s = None
                if method.smooth and folds:
                    weights = [weight_in_out(m).numpy().astype(np.float32) for m in mods]
                    s = q.smooth_scale(amax[first], weights, searched.alphas[first])
                    migrate(model, base, mods, folds, s)
                scale = None
                if method.activations is not None:
                    clip = searched.activation_clips.get(first, 1.0)
                    scale = q.activation_scale(amax[first], s, method.activations, clip)
                    scales.append(scale)
                fake_quantize(mods, method, GROUP, scale)
    return reference, model, scales


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["int8-wo", "int4-rtn", "int8-sq", "fp8"])
def test_onnx_runtime_matches_fake_quantized_torch(quantized: Any, model: str, method: str) -> None:
    from llm2trt.backends.decoder import open_session
    from llm2trt.backends.onnxruntime.decoder import ort_executor
    from llm2trt.core.manifest import Manifest

    spec = METHODS.get(method)
    path = quantized(model, method)
    manifest = Manifest.read(path)
    assert manifest.quantization is not None
    proto = graph(path)
    reference, fake, scales = fake_quantized(model, spec, manifest.quantization)
    # Calibration in ONNX Runtime agrees with PyTorch's: the activation scales in the graph.
    inits = initializers(proto)
    graph_scales = [float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert np.allclose(sorted(graph_scales), sorted(scales), rtol=1e-4)
    # Weight scales: the graph's against PyTorch's (smoothed) weights; a fake-quantized weight keeps
    # its amax (the largest element maps to the top code exactly), so its scale is the original's.
    for module, node in weight_dqs(proto).items():
        w = weight_in_out(fake.get_submodule(module)).detach().numpy()
        expected = q.weight_scale(w, spec, GROUP)
        assert np.allclose(inits[node.input[1]], expected, rtol=1e-4), module
    ids = np.random.default_rng(3).integers(0, 1000, size=24).tolist()
    session = open_session(manifest.graph(), ort_executor(str(path / "model.onnx")), capacity=32)
    ort = session.prompt_logits(ids)
    with torch.no_grad():
        want = fake(torch.tensor([ids])).logits[0].numpy()
        plain = reference(torch.tensor([ids])).logits[0].numpy()
    err, quant_effect = errors(ort, want).max_rel_err, errors(plain, want).max_rel_err
    # Measured: 2e-7..3e-7 (fp32 rounding) for every method, W8A8 included; quantization itself moves
    # the logits 4e-3..1e-1. A misplaced Q/DQ, a wrong scale or a missed fold shows at 1e-3 and up.
    assert err < 1e-5, (err, quant_effect)
    assert err < quant_effect / 1000, (err, quant_effect)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", [m for m in METHODS if METHODS.get(m).activations is DType.INT8])
def test_w8a8_weight_codes_cannot_saturate_int16_pair_sums(quantized: Any, model: str, method: str) -> None:
    """On x86, ONNX Runtime runs an INT8 activation Q/DQ -> MatMul <- weight DQ as one uint8 x int8 GEMM
    (activation codes + 128); CPUs without VNNI add the products of input channels 2k and 2k+1 in saturating
    int16, so 255 * (|q[2k]| + |q[2k+1]|) must stay within 32767 for every CPU to compute the same. Every
    W8A8 weight keeps it, and ONNX Runtime's fused graph computes what its unfused one does."""
    from llm2trt.core.numerics import run_ort

    path = quantized(model, method)
    proto = graph(path)
    inits = initializers(proto)
    for module, node in weight_dqs(proto).items():
        codes = np.abs(inits[node.input[0]].astype(np.int32))
        pairs = codes[0 : codes.shape[0] - 1 : 2] + codes[1::2]  # [in // 2, out]
        assert 255 * int(pairs.max()) <= np.iinfo(np.int16).max, (module, int(pairs.max()))
    ids = np.random.default_rng(4).integers(0, 1000, size=(1, 24))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(24)[None]}
    for value in proto.graph.input:  # an empty cache: [batch 1, heads, past 0, head_dim]
        if value.name not in feeds:
            dims = [d.dim_value or (1 if i == 0 else 0) for i, d in enumerate(value.type.tensor_type.shape.dim)]
            feeds[value.name] = np.zeros(dims, np.float32)
    fused = run_ort(path / "model.onnx", feeds)["logits"]
    unfused = run_ort(path / "model.onnx", feeds, disable_optimizations=True)["logits"]
    assert errors(fused, unfused).max_rel_err < 1e-5


# -- the rest of the contract -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["int8-sq", "fp8", "int4-awq", "int4-gptq"])
def test_quantized_graph_builds_with_tensorrt_and_counts_precisions(
    quantized: Any, method: str, tmp_path: Path
) -> None:
    spec = METHODS.get(method)
    path = quantized("tiny:llama", method)
    result = run_cli("build", path, "-o", tmp_path / "engine", *CC, "-q")
    assert result.exit_code == 0, result.stderr
    info = json.loads((tmp_path / "engine" / "build.json").read_text())
    act = spec.activations.value if spec.activations else "fp32"
    assert info["matmul_precisions"] == {f"{act} x {spec.weights.value}": 14, "fp32 x fp32": 1}
    assert info["layer_precisions"][spec.weights.value] >= 14
    assert info["unfused_qdq"] == [] and info["quantization"] == method


def test_unfused_qdq_is_reported() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="dq"),
        helper.make_node("Add", ["xd", "xd"], ["y"], name="add"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
            [numpy_helper.from_array(np.array(0.1, np.float32), "s")],
        )
    )
    assert unfused_qdq(model) == ["DequantizeLinear dq feeds Add"]


def test_bad_quant_requests_fail_cleanly(artifacts: dict[str, Path], quantized: Any, tmp_path: Path) -> None:
    llama = artifacts["tiny:llama"]
    cases = [
        (["--quant", "int4-rtn", "--group-size", "48"], "--group-size must be a power of two"),
        (["--quant", "fp8", "--calib", str(tmp_path / "none.txt")], "no text file at"),
        (["--quant", "int8-sq", "--alpha", "2", "--calib", str(CALIB)], "--alpha must be in [0, 1]"),
    ]
    for args, fragment in cases:
        out = tmp_path / "out"
        assert_clean_failure(run_cli("optimize", llama, "-o", out, *args), fragment, out)
    out = tmp_path / "again"
    again = run_cli("optimize", quantized("tiny:llama", "int8-wo"), "-o", out, "--quant", "int8-wo")
    assert_clean_failure(again, "is already quantized (int8-wo)", out)
    bert = run_cli("optimize", artifacts["tiny:bert"], "-o", out, "--quant", "fp8", "--calib", CALIB)
    assert_clean_failure(bert, "needs a decoder artifact", out)


def test_layers_the_group_size_does_not_divide_use_smaller_blocks(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "g128"
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--quant", "int4-rtn", "-q")  # group 128
    assert result.exit_code == 0, result.stderr
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    assert len(quant["quantized"]) == LINEARS["tiny:llama"] and quant["group_size"] == 128
    # TensorRT needs whole blocks: hidden 64 takes blocks of 64; down_proj's 128 inputs keep 128.
    assert set(quant["block_sizes"].values()) == {64} and len(quant["block_sizes"]) == 12
    assert not any("down_proj" in m for m in quant["block_sizes"])
    blocks = {
        n.name: onnx.helper.get_attribute_value(n.attribute[1])
        for n in graph(out).graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert sorted(Counter(blocks.values()).items()) == [(64, 12), (128, 2)]


def test_keep_sensitive_leaves_the_worst_groups_in_high_precision(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sq"
    args = [*method_args("int8-sq"), "--keep-sensitive", "2"]
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, *args, "-q")
    assert result.exit_code == 0, result.stderr
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    sensitivity = quant["sensitivity"]
    assert len(sensitivity) == INPUTS["tiny:llama"] and all(0 < e < 1 for e in sensitivity.values())
    worst = sorted(sensitivity, key=lambda m: -sensitivity[m])[:2]
    sensitive = {m for m, why in quant["kept"].items() if why.startswith("sensitive")}
    assert set(worst) <= sensitive  # each group's first layer, and the rest of its group with it
    ops = Counter(n.op_type for n in graph(out).graph.node)
    assert ops["QuantizeLinear"] == INPUTS["tiny:llama"] - 2
    assert ops["DequantizeLinear"] == LINEARS["tiny:llama"] - len(sensitive) + ops["QuantizeLinear"]


@pytest.mark.parametrize(("model", "smoothed"), [("tiny:llama", 12), ("tiny:gpt2", 4)])
def test_smoothing_folds_into_unfused_norms_too(
    artifacts: dict[str, Path], tmp_path: Path, model: str, smoothed: int
) -> None:
    """Without the norm fusions, 1/s goes into the decomposed norm's final Mul (and LayerNorm's Add)."""
    out = tmp_path / "sq"
    skip = ["--skip-fusion", "RMSNorm", "--skip-fusion", "LayerNorm"]
    result = run_cli("optimize", artifacts[model], "-o", out, *method_args("int8-sq"), *skip, "-q")
    assert result.exit_code == 0, result.stderr
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    assert quant["smoothed"] == smoothed  # llama: q/k/v, gate/up and down per layer; gpt2: c_attn, c_fc
    report = json.loads((out / "report.json").read_text())
    assert report["numeric_check"]["passed"] and min(report["numeric_check"]["cosine"].values()) > 0.99


def test_calibration_and_the_scale_search_report_progress(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4-awq on SmolLM2 took six minutes: calibration says what it runs before its first window,
    and a pass busy longer than a while (here made 50 ms) says it is still running."""
    from llm2trt.passes import manager

    monkeypatch.setattr(manager, "STILL_RUNNING_SECONDS", 0.05)
    out = tmp_path / "awq"
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, *method_args("int4-awq"))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    start = f"[llm2trt] calibrating on {CALIB.name} ({SAMPLES} windows of up to 256 tokens) ..."
    assert start in lines, result.stderr
    assert any(line.startswith(f"[llm2trt] calibrating on {CALIB.name}") and "done in" in line for line in lines)
    assert any(line.startswith("[llm2trt] pass quantize: still running (") for line in lines), result.stderr


def test_a_calibration_text_shorter_than_the_samples_asked_is_refused(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    text = tmp_path / "short.txt"
    text.write_text("x" * 300)  # tiny models calibrate on bytes: windows of 256, so two
    out = tmp_path / "out"
    args = ["--quant", "int8-sq", "--calib", str(text), "--calib-samples", "4"]
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, *args)
    assert_clean_failure(result, "makes 2 calibration windows of 256 tokens; --calib-samples asks for 4", out)
    one = run_cli("optimize", artifacts["tiny:llama"], "-o", out, *args[:-1], "1", "-q")
    assert one.exit_code == 0, one.stderr
