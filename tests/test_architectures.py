"""The architectures added after the Llama family (Qwen3, Gemma 3, Phi-3, BLOOM) through the stages the
other test files do not parametrize over: tensor parallelism against transformers, the fused graph in
`compare`, `inspect`'s account of the cache forms, and the config checks. Their greedy tokens per cache
form are in test_generate.py, engines in test_build.py, Q/DQ in passes/test_quant.py, marks and bisect in
test_debug.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.exporters import get_spec
from llm2trt.generate.driver import Sampling, generate
from tests.conftest import assert_clean_failure, run_cli, run_json
from tests.test_generate import NEW, hf_generate

NEW_ARCHS = ["tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom"]
PROMPTS = [[11, 57, 300, 8, 91], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [400, 3, 77], [9, 8, 7, 6, 5, 4, 3, 2]]


@pytest.mark.parametrize("name", ["tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom"])
def test_tp2_tokens_equal_transformers(name: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    code, result = run_json("optimize", artifacts[name], "-o", out, "--tp", "2", "-q")
    assert code == 0, result
    assert result["numeric_check"]["passed"] and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    model = resolve_model(name).load(DType.FP32)
    pad = int(model.config.pad_token_id or 0)  # what generate pads with (the manifest's pad id)
    reference = hf_generate(model, PROMPTS, pad=pad)
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == reference
    single = generate(out, ids=[PROMPTS[1]], sampling=Sampling(NEW))
    assert single.rows[0].new_ids == hf_generate(model, [PROMPTS[1]], pad=pad)[0]


@pytest.mark.parametrize("name", NEW_ARCHS)
def test_fused_graph_compares_within_fp32_tolerance(name: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fused"
    code, report = run_json("optimize", artifacts[name], "-o", out, "-q")
    assert code == 0, report
    assert not report["missing"] and report["fusions"]["Attention"] == 2
    code, result = run_json("compare", out, "-q")
    assert code == 0 and result["passed"] and result["main_max_rel_err"] <= 1e-4, result


def test_gemma3_cache_records_its_sliding_layers(artifacts: dict[str, Path]) -> None:
    code, view = run_json("inspect", artifacts["tiny:gemma3"])
    assert code == 0
    assert view["manifest"]["kv_cache"]["windows"] == [6, 0]  # local, then global
    text = run_cli("inspect", artifacts["tiny:gemma3"]).stdout
    assert "cache forms   growing, fixed, gqa" in text and "sliding       window 6 on 1 layer of 2" in text


def test_bloom_refuses_the_buffer_forms_naming_why(artifacts: dict[str, Path], tmp_path: Path) -> None:
    text = run_cli("inspect", artifacts["tiny:bloom"]).stdout
    assert "cache forms   growing; not fixed, gqa: ALiBi counts positions from the attention mask" in text
    for form in ("fixed", "gqa"):
        out = tmp_path / form
        result = run_cli("optimize", artifacts["tiny:bloom"], "-o", out, "--kv-form", form)
        assert_clean_failure(result, f"bloom has no graph with a {form} KV cache: ALiBi", out)


# Narrowed per rank, in each of BLOOM's 2 layers: the qkv view [b, s, heads, 3, d], the
# (batch*heads, s, d) view of the context (a Mul by the head count) and its (batch, heads, s, d) view
# (a Div by it and the count itself); once: ALiBi's (batch*heads, 1, keys) view and, fused, the
# bias's (batch, heads, 1, keys) view, or, unfused, the q/k/v and score views of each layer.
@pytest.mark.parametrize(("skip", "views"), [((), 8), (("--skip-fusion", "Attention"), 9)])
def test_bloom_tp_narrows_alibi_and_head_views(
    skip: tuple[str, ...], views: int, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tp2"
    code, result = run_json("optimize", artifacts["tiny:bloom"], "-o", out, "--tp", "2", *skip, "-q")
    assert code == 0, result
    assert result["numeric_check"]["passed"] and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5
    for rank in result["ranks"]:  # the slopes keep the rank's 2 heads of 4
        assert rank["counts"]["head_tables"] == 1 and rank["counts"]["head_views"] == views, rank
    if skip:  # BLOOM's own baddbmm attention, split, gives transformers' tokens too
        model = resolve_model("tiny:bloom").load(DType.FP32)
        got = generate(out, ids=PROMPTS, sampling=Sampling(NEW))
        assert [row.new_ids for row in got.rows] == hf_generate(model, PROMPTS, pad=3)


def test_qwen3_head_size_is_the_configs() -> None:
    spec = get_spec("qwen3")
    config = spec.make_tiny_config()
    layout = spec.kv_layout(config)
    assert layout.head_dim == 32 != config.hidden_size // config.num_attention_heads


def test_config_checks_name_the_cause() -> None:
    gemma = get_spec("gemma3")
    with pytest.raises(InputError, match="soft-capping"):
        gemma.check_config(transformers.Gemma3TextConfig(final_logit_softcapping=30.0))
    with pytest.raises(InputError, match=r"num_attention_heads \(6\) is not a multiple of num_key_value_heads \(4\)"):
        get_spec("qwen3").check_config(transformers.Qwen3Config(num_attention_heads=6, num_key_value_heads=4))


def test_gemma3_multimodal_checkpoint_exports_its_text_tower(tmp_path: Path) -> None:
    import torch

    text = get_spec("gemma3").make_tiny_config()
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    full = transformers.Gemma3ForConditionalGeneration(config).eval()
    full.save_pretrained(str(tmp_path / "hf"))
    code, result = run_json("convert", tmp_path / "hf", "-o", tmp_path / "onnx", "-q")
    assert code == 0, result
    assert (
        result["manifest"]["model_type"] == "gemma3_text" and result["manifest"]["model_class"] == "Gemma3ForCausalLM"
    )
    reference = hf_generate(full, PROMPTS, pad=0)  # the multimodal model on text alone
    got = generate(tmp_path / "onnx", ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == reference


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["tiny:qwen3", "tiny:gemma3"])
def test_half_precision_exports_fuse(name: str, dtype: str, tmp_path: Path) -> None:
    code, result = run_json("convert", name, "-o", tmp_path / "onnx", "--dtype", dtype, "-q")
    assert code == 0 and result["manifest"]["dtype"] == dtype, result
    code, report = run_json("optimize", tmp_path / "onnx", "-o", tmp_path / "opt", "-q")
    assert code == 0 and not report["missing"], report
    assert report["fusions"]["RMSNorm"] == report["expected"]["RMSNorm"] >= 9
    if dtype == "fp16":  # ONNX Runtime's CPU provider runs fp16 (not bf16): the check ran
        assert report["numeric_check"]["passed"] and report["numeric_check"]["checked"]
        # The fast CUDA form's graph: Gemma 3 normalizes in float32, so its QK-norm sits between casts.
        code, report = run_json("optimize", tmp_path / "onnx", "-o", tmp_path / "gqa", "--kv-form", "gqa", "-q")
        assert code == 0 and report["numeric_check"]["passed"] and report["numeric_check"]["checked"], report
        # llm2trt's attention op takes the QK-norm (and Gemma 3's window) in every layer.
        kernels = next(p for p in report["passes"] if p["name"] == "ort_kernels")["counts"]
        assert kernels["GroupQueryAttentionQKNorm"] == 2 and kernels["GroupQueryAttention"] == 0, kernels


def test_phi3_refuses_gqa_only_with_longrope() -> None:
    spec = get_spec("phi3")
    assert "gqa" not in spec.kv_forms_for(spec.make_tiny_config())  # LongRoPE
    assert spec.kv_forms_for(transformers.Phi3Config()) == ("growing", "fixed", "gqa")  # one set of frequencies
    assert spec.kv_forms_for({"rope_parameters": {"rope_type": "default"}}) == ("growing", "fixed", "gqa")


def test_phi3_without_longrope_runs_the_gqa_form(tmp_path: Path) -> None:
    import torch

    fields = {k: v for k, v in get_spec("phi3").tiny_config.items() if k not in ("rope_parameters",)}
    config = transformers.Phi3Config(**{**fields, "original_max_position_embeddings": 256})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    assert run_cli("convert", tmp_path / "hf", "-o", tmp_path / "onnx", "-q").exit_code == 0
    code, report = run_json("optimize", tmp_path / "onnx", "-o", tmp_path / "gqa", "--kv-form", "gqa", "-q")
    assert code == 0 and not report["missing"], report
    got = generate(tmp_path / "gqa", ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == hf_generate(model, PROMPTS, pad=0)
