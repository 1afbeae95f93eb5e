"""A real model: Gemma 3 270M (Gemma3ForCausalLM: 18 layers, sliding-window 512 local layers with a
global layer every 6th, 4 heads / 1 KV head of 256, a 262,144-token vocabulary) from its Q4_K_M GGUF:
greedy tokens of the exporter's growing-cache graph and of the fused one identical to transformers'
own fp32 model loaded from the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm2trt.convert.sources import source_from_info
from llm2trt.convert.tokenizer import load_tokenizer, windows_of
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from tests.conftest import cli_artifact, run_json
from tests.test_generate import _zen, hf_generate

NEW = 32
PROMPTS = (Path(__file__).parent / "data" / "gemma3_prompts.txt").read_text().splitlines()
LAYERS = 18


@pytest.fixture(scope="module")
def gemma3_fused(gemma3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cli_artifact(tmp_path_factory, "gemma3-fused", "optimize", gemma3_artifact)


@pytest.mark.xdist_group("gemma3")  # one worker converts and optimizes once
def test_gemma3_greedy_tokens_match_transformers(
    gemma3_artifact: Path, gemma3_fused: Path, gemma3_gguf: Path, tmp_path: Path
) -> None:
    manifest = Manifest.read(gemma3_artifact)
    assert (manifest.architecture, manifest.model_class) == ("gemma3", "Gemma3ForCausalLM")
    assert manifest.source.kind == "gguf"
    assert manifest.source.location == str(gemma3_gguf)
    config = manifest.model_config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (LAYERS, 4, 1)
    assert config["sliding_window"] == 512
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    assert manifest.outputs[0].shape == ["batch", "sequence", 262144]
    assert manifest.generation is not None and manifest.generation.eos_token_ids == [1]
    # Per layer: Attention 1, RMSNorm 6 (+1, the final norm), RoPE 2 (Q and K), Gelu 1.
    fused = Manifest.read(gemma3_fused)
    want = {"Attention": LAYERS, "RMSNorm": 6 * LAYERS + 1, "RoPE": 2 * LAYERS, "Gelu": LAYERS}
    assert fused.expected_fusions == want
    assert {k: v for k, v in fused.fusions.items() if v} == want

    # Gemma wants its <bos> first (the tokenizer's own encoding adds it): without one the 270M model
    # only repeats itself. Each prompt alone, unpadded, cut after EOS.
    tokenizer = load_tokenizer(gemma3_artifact, manifest)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert all(p[0] == 2 for p in prompts)
    model = source_from_info(manifest.source).load(DType.FP32)
    reference = [hf_generate(model, [p], pad=0)[0] for p in prompts]
    assert sum(len(r) for r in reference) >= 4 * NEW  # (at most one stops early, at EOS)
    got = generate(gemma3_artifact, ids=prompts, sampling=Sampling(NEW))  # all five in one batch
    assert [row.new_ids for row in got.rows] == reference
    fused_rows = generate(gemma3_fused, prompts=PROMPTS, sampling=Sampling(NEW)).rows  # text: <bos> added
    assert [row.ids[: len(p)] for row, p in zip(fused_rows, prompts, strict=True)] == prompts
    assert [row.new_ids for row in fused_rows] == reference
    assert "100 degrees Celsius" in tokenizer.decode(reference[PROMPTS.index("Water boils at a temperature of")])

    # eval ppl: the fused graph's perplexity over 64-token windows equals transformers' own loss.
    text = _zen(tmp_path)
    ids = tokenizer(text.read_text(), add_special_tokens=False).input_ids
    total, scored = 0.0, 0
    with torch.no_grad():
        for window in windows_of(ids, 64):
            loss = model(input_ids=torch.tensor([window]), labels=torch.tensor([window])).loss
            total, scored = total + float(loss) * (len(window) - 1), scored + len(window) - 1
    code, got = run_json("eval", "ppl", gemma3_fused, "--text", text, "--window", "64", "-q")
    assert code == 0 and got["scored"] == scored, got
    assert abs(got["ppl"] / float(np.exp(total / scored)) - 1) < 1e-4, (got["ppl"], np.exp(total / scored))


@pytest.mark.xdist_group("gemma3")
def test_gemma3_tokenizer_is_transformers_without_transformers(gemma3_artifact: Path) -> None:
    from tests.test_fast_tokenizer import same_as_transformers

    same_as_transformers(gemma3_artifact)
