"""Gemma 3 in fp16: a residual stream past fp16's range (as the 270M model's is on <bos>-led prompts)
stays finite because convert keeps it in float32 (passes/residual.py); without that the same export's
logits are inf/NaN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx.reference import ReferenceEvaluator

from llm2trt.core.manifest import Manifest
from llm2trt.exporters import get_spec
from llm2trt.exporters.gemma3 import Gemma3Spec
from tests.conftest import run_json

FP16_MAX = 65504.0
IDS = np.array([[2, 57, 300, 8, 91, 11, 5, 700]], dtype=np.int64)


@pytest.fixture(scope="module")
def loud_gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, float]]:
    """tiny:gemma3 whose post-feedforward norms scale by 18,000: each sublayer's output fits fp16, their
    sum along the residual does not. Returns the checkpoint, its fp32 logits and the peaks seen."""
    config = get_spec("gemma3").make_tiny_config()
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    peaks: dict[str, float] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            tensor = out[0] if isinstance(out, tuple) else out
            peaks[name] = max(peaks.get(name, 0.0), float(tensor.abs().max()))

        return hook

    for layer in model.model.layers:
        layer.post_feedforward_layernorm.weight.data.fill_(18000.0)
        layer.post_feedforward_layernorm.register_forward_hook(record("branch"))
        layer.post_attention_layernorm.register_forward_hook(record("branch"))
        layer.register_forward_hook(record("residual"))
    with torch.no_grad():
        logits = model(torch.from_numpy(IDS)).logits.numpy()
    path = tmp_path_factory.mktemp("loud") / "hf"
    model.save_pretrained(str(path))
    return path, logits, peaks


def _logits(artifact: Path) -> np.ndarray:
    """The graph run op by op in its own types by ONNX's reference evaluator: ONNX Runtime's CPU
    provider computes fp16 Adds in float32 and so hides the overflow a GPU shows."""
    model = onnx.load(str(artifact / "model.onnx"))
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None]}
    names = {i.name for i in model.graph.input}
    with np.errstate(over="ignore", invalid="ignore"):
        out = ReferenceEvaluator(model).run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    return np.asarray(out, dtype=np.float32)


def _convert(hf: Path, out: Path) -> Manifest:
    code, result = run_json("convert", hf, "-o", out, "--dtype", "fp16", "--no-kv-cache", "-q")
    assert code == 0, result
    return Manifest.read(out)


def test_fp16_residual_in_float32_stays_finite(
    loud_gemma3: tuple[Path, np.ndarray, dict[str, float]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf, reference, peaks = loud_gemma3
    assert peaks["branch"] < FP16_MAX < peaks["residual"]  # the premise: only the sum leaves fp16's range

    manifest = _convert(hf, tmp_path / "kept")
    [record] = [p for p in manifest.passes if p.name == "float32_residual"]
    layers = 2
    assert record.stage == "convert" and record.counts == {"float32_adds": 2 * layers, "upcasts_dropped": 2 * layers}
    graph = onnx.load(str(tmp_path / "kept" / "model.onnx"), load_external_data=False).graph
    # The residual Adds of every layer read a float32 upcast or an earlier float32 sum.
    sums = [n for n in graph.node if n.op_type == "Add" and n.name.endswith(("layers.0/Add", "layers.1/Add_1"))]
    assert len(sums) == 2 and all(any(o.endswith(".f32") for o in n.output) for n in sums)
    kept = _logits(tmp_path / "kept")
    assert np.isfinite(kept).all()
    cos = float((kept * reference).sum() / np.linalg.norm(kept) / np.linalg.norm(reference))
    assert cos > 0.999 and np.array_equal(kept.argmax(-1), reference.argmax(-1)), cos

    monkeypatch.setattr(Gemma3Spec, "fp16_residual_in_float32", False)
    plain = _convert(hf, tmp_path / "plain")
    assert not plain.passes
    assert not np.isfinite(_logits(tmp_path / "plain")).all()  # what the pass prevents


def test_other_dtypes_keep_the_graph_as_exported(tmp_path: Path) -> None:
    code, result = run_json("convert", "tiny:gemma3", "-o", tmp_path / "bf16", "--dtype", "bf16", "-q")
    assert code == 0 and not result["manifest"]["passes"], result  # bf16 has float32's range
