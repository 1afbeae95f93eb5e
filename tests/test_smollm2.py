"""A real model: SmolLM2-135M-Instruct (Llama architecture, GQA) from its GGUF file."""

from __future__ import annotations

from pathlib import Path

from llm2trt.core.manifest import Manifest
from tests.conftest import run_json


def test_smollm2_converts_and_matches_transformers(smollm2_artifact: Path, smollm2_gguf: Path) -> None:
    manifest = Manifest.read(smollm2_artifact)
    assert (manifest.architecture, manifest.model_class, manifest.source.kind) == ("llama", "LlamaForCausalLM", "gguf")
    assert manifest.source.location == str(smollm2_gguf)
    config = manifest.model_config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert manifest.outputs[0].shape == ["batch", "sequence", 49152]
    # The weights (fp32, dequantized from Q4_1) are in external data: the graph file stays small.
    assert (smollm2_artifact / "model.onnx").stat().st_size < 5_000_000
    assert (smollm2_artifact / "model.onnx.data").stat().st_size > 500_000_000
    code, result = run_json("compare", smollm2_artifact, "-q")
    assert code == 0, result
    assert result["main_output"] == "logits" and result["main_max_rel_err"] <= 1e-4
