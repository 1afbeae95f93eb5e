"""Every registered architecture exports, and its ONNX graph matches transformers numerically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

from llm2trt.convert.sources import spec_and_config
from llm2trt.core.dtypes import DType
from llm2trt.core.kv import KVLayout, past_name, present_name
from llm2trt.core.manifest import Manifest
from llm2trt.exporters import all_specs, spec_for_model_type
from tests.conftest import TINY, run_cli, run_json

# Main output of each built-in tiny model, and the fp32 bound the issue sets.
MAIN_OUTPUT = {
    **dict.fromkeys(("tiny:gpt2", "tiny:llama", "tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom"), "logits"),
    **dict.fromkeys(("tiny:mixtral", "tiny:qwen3_moe", "tiny:qwen2_moe"), "logits"),
    "tiny:bert": "last_hidden_state",
    "tiny:vit": "logits",
}
FP32_REL = 1e-4


def test_every_registered_spec_is_tested() -> None:
    assert sorted(TINY) == sorted(MAIN_OUTPUT), "a registered exporter has no numeric test"


@pytest.mark.parametrize("name", TINY)
def test_tiny_export_matches_transformers(name: str, artifacts: dict[str, Path]) -> None:
    code, result = run_json("compare", artifacts[name], "-q")
    assert code == 0, result
    assert result["passed"] is True
    assert result["main_output"] == MAIN_OUTPUT[name]
    assert result["main_max_rel_err"] <= FP32_REL
    rows = [r for r in result["results"] if r["output"] == MAIN_OUTPUT[name]]
    assert rows and rows[0]["reference"] == "torch" and rows[0]["runner"] == "ort"
    # Compare runs shapes other than the traced ones (2x8): dynamic axes really are dynamic.
    assert (result["batch"], result["sequence"]) == (3, 12)


@pytest.mark.parametrize("name", TINY)
def test_manifest_and_external_data(name: str, artifacts: dict[str, Path]) -> None:
    path = artifacts[name]
    manifest = Manifest.read(path)
    raw = json.loads((path / "manifest.json").read_text())
    for key in (
        "architecture",
        "task",
        "dtype",
        "opset",
        "inputs",
        "outputs",
        "kv_cache",
        "passes",
        "source",
        "llm2trt_version",
    ):
        assert key in raw
    assert manifest.source.kind == "tiny" and len(manifest.source.sha256) == 64
    assert manifest.main_output == MAIN_OUTPUT[name]
    # Weights live in the external data file, not in model.onnx.
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.external_data[0].value == "model.onnx.data" for t in external)
    assert (path / "model.onnx").stat().st_size < (path / "model.onnx.data").stat().st_size
    # The graph's I/O carries the manifest's symbolic dims.
    graph_inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    for spec in manifest.inputs:
        assert graph_inputs[spec.name] == spec.shape


def test_decoder_manifest_describes_its_kv_cache(artifacts: dict[str, Path], tmp_path: Path) -> None:
    manifest = Manifest.read(artifacts["tiny:llama"])
    names = [t.name for t in manifest.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and manifest.graph().name == "decoder"
    layout = spec_for_model_type("llama").kv_layout(spec_and_config(manifest)[1])
    assert manifest.kv_cache == layout == KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, form="growing")
    assert names[3:] == layout.past_names and [t.name for t in manifest.outputs][1:] == layout.present_names
    assert manifest.graph().input("attention_mask").shape == ["batch", "total_sequence"]
    assert manifest.graph().input("past_key_values.1.value").shape == ["batch", 2, "past_sequence", 16]
    assert manifest.outputs[-1].shape == ["batch", 2, "total_sequence", 16]
    assert layout.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert layout.present_names[-1] == "present.1.value" == present_name(1, "value")
    assert past_name(0, "key") in layout.to_dict()["past_names"]
    assert KVLayout.from_dict(layout.to_dict()) == layout
    # --no-kv-cache: the whole-sequence graph of before.
    out = tmp_path / "logits"
    assert run_cli("convert", "tiny:llama", "-o", out, "--no-kv-cache", "-q").exit_code == 0
    plain = Manifest.read(out)
    assert plain.kv_cache is None and plain.graph().name == "logits" and len(plain.inputs) == 3


def _save_hf(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    "config_class, model_class",
    [
        ("MistralConfig", "MistralForCausalLM"),
        ("Qwen2Config", "Qwen2ForCausalLM"),
    ],
)
def test_llama_spec_takes_mistral_and_qwen2(config_class: str, model_class: str, tmp_path: Path) -> None:
    config = getattr(transformers, config_class)(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    src = _save_hf(model, tmp_path / "hf")
    assert spec_for_model_type(config.model_type).name == "llama"
    out = tmp_path / "onnx"
    assert run_cli("convert", src, "-o", out, "-q").exit_code == 0
    manifest = Manifest.read(out)
    assert (manifest.architecture, manifest.model_class) == ("llama", model_class)
    assert manifest.source.kind == "hf"
    code, result = run_json("compare", out, "-q")
    assert code == 0 and result["main_max_rel_err"] <= FP32_REL


def test_eager_attention_exports_too(tmp_path: Path) -> None:
    out = tmp_path / "eager"
    assert run_cli("convert", "tiny:gpt2", "-o", out, "--attn-implementation", "eager", "-q").exit_code == 0
    assert Manifest.read(out).attn_implementation == "eager"
    code, result = run_json("compare", out, "-q")
    assert code == 0 and result["main_max_rel_err"] <= FP32_REL


def test_fp16_export_is_typed_fp16(tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    assert run_cli("convert", "tiny:llama", "-o", out, "--dtype", "fp16", "-q").exit_code == 0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert Manifest.read(out).dtype is DType.FP16


def test_sample_inputs_pad_the_last_row() -> None:
    for spec in all_specs():
        config = spec.make_tiny_config()
        feeds = spec.sample_inputs(config, spec.graph_spec(config, DType.FP32), 2, 8)
        if "attention_mask" in feeds:
            mask = feeds["attention_mask"]
            assert mask[0].all() and not mask[-1].all() and mask[-1, 0] == 1
        for value in feeds.values():
            assert np.all(np.isfinite(value.astype(np.float64)))
