"""optimize --tp: rank graphs that together compute the unsplit model (rank harness, gloo), per-rank
engines that build, and refusals that name the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import transformers

from llm2trt.core.manifest import Manifest
from tests.conftest import CC, assert_clean_failure, run_cli, run_json

# Odd vocabularies (neither divides by 2 or 4: the lm_head is padded), fewer KV heads than 4 ranks,
# biases everywhere GPT-2 has them and on Qwen2's q/k/v; weights large enough that greedy tokens vary.
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
}
CONFIGS: dict[str, Any] = {
    "llama": transformers.LlamaConfig(vocab_size=1003, **_LLAMA_LIKE),
    "gpt2": transformers.GPT2Config(
        vocab_size=1001, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2
    ),
    "qwen2": transformers.Qwen2Config(vocab_size=1001, **_LLAMA_LIKE),
}
MODELS = {
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "qwen2": transformers.Qwen2ForCausalLM,
}
KV_HEADS = {"llama": 2, "gpt2": 4, "qwen2": 2}
PROMPT = "1,2,3,4,5"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for name, config in CONFIGS.items():
        transformers.set_seed(0)
        MODELS[name](config).save_pretrained(str(root / f"{name}-hf"))
        result = run_cli("convert", root / f"{name}-hf", "-o", root / name, "-q")
        assert result.exit_code == 0, result.stderr
        out[name] = root / name
    return out


def _tokens(artifact: Path) -> list[int]:
    code, result = run_json("generate", artifact, "--ids", PROMPT, "--max-new-tokens", "32", "-q")
    assert code == 0, result
    ids: list[int] = result["ids"]
    return ids


@pytest.mark.parametrize(("name", "tp"), [("llama", 2), ("llama", 4), ("gpt2", 2), ("gpt2", 4), ("qwen2", 2)])
def test_ranks_together_equal_the_unsplit_model(converted: dict[str, Path], tmp_path: Path, name: str, tp: int) -> None:
    out = tmp_path / f"{name}-tp{tp}"
    code, result = run_json("optimize", converted[name], "-o", out, "--tp", str(tp), "-q")
    assert code == 0, result
    # The check ran every rank in the harness (gloo) against the input artifact, step by step.
    check = result["numeric_check"]
    assert check["checked"] and check["passed"] and len(check["max_rel_err"]) == 4
    assert max(check["max_rel_err"].values()) <= 1e-5, check
    layers = 2
    for rank, report in enumerate(result["ranks"]):
        assert report["rank"] == rank
        counts = report["counts"]
        # One all-reduce after each row-parallel layer (2 a layer) and the embedding; one gather.
        assert (counts["row"], counts["all_reduce"], counts["all_gather"]) == (2 * layers, 2 * layers + 1, 1)
        # llama's 2 KV heads: split at tp 2, each replicated over two ranks at tp 4.
        assert report["kv_heads"] == max(1, KV_HEADS[name] // tp)
        assert report["fusions"]["Attention"] == layers  # the expected-fusion gate holds per rank
    manifest = Manifest.read(out)
    assert manifest.tensor_parallel is not None and manifest.tensor_parallel.ranks == [f"rank{r}" for r in range(tp)]
    for rank in range(tp):
        rank_manifest = Manifest.read(out / f"rank{rank}")
        assert rank_manifest.tensor_parallel is not None and rank_manifest.tensor_parallel.rank == rank
        kv = rank_manifest.graph().kv_cache
        assert kv is not None and kv.num_kv_heads == max(1, KV_HEADS[name] // tp)
        proto = onnx.load(str(out / f"rank{rank}" / "model.onnx"), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("DistCollective") == 2 * layers + 2
        logits = next(o for o in proto.graph.output if o.name == "logits")
        assert logits.type.tensor_type.shape.dim[2].dim_value == CONFIGS[name].vocab_size  # padding dropped
    assert _tokens(out) == _tokens(converted[name])


def test_per_rank_engines_build(converted: dict[str, Path], tmp_path: Path) -> None:
    split = tmp_path / "tp2"
    assert run_cli("optimize", converted["llama"], "-o", split, "--tp", "2", "--no-check", "-q").exit_code == 0
    code, built = run_json("build", split, "-o", tmp_path / "engines", *CC, "-q")
    assert code == 0, built
    assert built["tp"] == 2 and [r["engine"] for r in built["ranks"]] == ["rank0.engine", "rank1.engine"]
    for rank in built["ranks"]:
        assert rank["profile_names"] == ["prefill", "decode"]
        assert rank["layer_types"]["DIST_COLLECTIVE"] == 2 * 2 + 2  # NCCL layers, one per collective
        assert (tmp_path / "engines" / rank["engine"]).stat().st_size == rank["engine_bytes"] > 0
    assert json.loads((tmp_path / "engines" / "build.json").read_text())["tp"] == 2


def test_smollm2_shape_refusals_name_the_numbers(tmp_path: Path) -> None:
    # SmolLM2's attention (9 heads, 3 KV heads) at tiny width: tp 3 splits, tp 2 cannot.
    config = transformers.LlamaConfig(
        vocab_size=500,
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    assert run_cli("convert", tmp_path / "hf", "-o", tmp_path / "onnx", "-q").exit_code == 0
    out = tmp_path / "tp2"
    assert_clean_failure(
        run_cli("optimize", tmp_path / "onnx", "-o", out, "--tp", "2"),
        "--tp 2: 9 attention heads do not divide into 2 ranks",
        out,
    )
    code, result = run_json("optimize", tmp_path / "onnx", "-o", tmp_path / "tp3", "--tp", "3", "-q")
    assert code == 0 and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5, result


def test_tp_refusals(artifacts: dict[str, Path], converted: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean_failure(
        run_cli("optimize", artifacts["tiny:bert"], "-o", out, "--tp", "2"),
        "bert declares no tensor-parallel split",
        out,
    )
    assert_clean_failure(
        run_cli("optimize", converted["llama"], "-o", out, "--tp", "0"), "--tp must be at least 1", out
    )
    assert_clean_failure(
        run_cli("optimize", converted["llama"], "-o", out, "--tp", "2", "--quant", "int8-wo"),
        "--tp with quantization",
        out,
    )
    split = tmp_path / "split"
    assert run_cli("optimize", converted["llama"], "-o", split, "--tp", "2", "--no-check", "-q").exit_code == 0
    assert_clean_failure(run_cli("optimize", split, "-o", out, "--tp", "2"), "is a tensor-parallel artifact", out)
    assert_clean_failure(run_cli("compare", split), "compare: this artifact is tensor-parallel (tp 2")
    assert_clean_failure(run_cli("generate", split, "--ids", "1,2", "--runner", "trt"), "runs on the rank harness")
    assert_clean_failure(run_cli("build", split / "rank1", "-o", out), "is one rank of a tensor-parallel artifact", out)


def test_smollm2_tp3_gives_the_unsplit_tokens(smollm2_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp3"
    code, result = run_json("optimize", smollm2_artifact, "-o", out, "--tp", "3", "-q")
    assert code == 0, result
    assert max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5
    assert [r["kv_heads"] for r in result["ranks"]] == [1, 1, 1]
    prompt = ["--prompt", "The capital of France is", "--max-new-tokens", "32", "-q"]
    code, split = run_json("generate", out, *prompt)
    code_ref, whole = run_json("generate", smollm2_artifact, *prompt)
    assert code == code_ref == 0
    assert split["ids"] == whole["ids"] and split["text"].startswith(" Paris")
    assert_clean_failure(
        run_cli("optimize", smollm2_artifact, "-o", tmp_path / "tp2", "--tp", "2"),
        "9 attention heads do not divide into 2 ranks",
    )
