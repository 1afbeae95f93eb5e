"""compare: Polygraphy's Comparator over PyTorch and ONNX Runtime; a breach exits 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from llm2trt.compare.driver import CompareResult, OutputResult, compare
from tests.conftest import CC, run_cli, run_json


def _perturb_weight(artifact: Path, tmp_path: Path, name_part: str) -> Path:
    """A copy of the artifact with one weight scaled in its external data file."""
    broken = tmp_path / "perturbed"
    shutil.copytree(artifact, broken)
    proto = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if name_part in t.name and t.data_location == 1)
    meta = {e.key: e.value for e in tensor.external_data}
    offset, length = int(meta["offset"]), int(meta["length"])
    with open(broken / "model.onnx.data", "r+b") as fh:
        fh.seek(offset)
        values = np.frombuffer(fh.read(length), dtype=np.float32) * 1.5
        fh.seek(offset)
        fh.write(values.astype(np.float32).tobytes())
    return broken


def test_breach_exits_1_and_flags_the_first_row(artifacts: dict[str, Path], tmp_path: Path) -> None:
    broken = _perturb_weight(artifacts["tiny:bert"], tmp_path, "pooler")
    result = run_cli("compare", broken)
    assert result.exit_code == 1
    assert "FAIL <- first breach" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("torch")]
    # last_hidden_state does not see the pooler: it still passes; pooler_output breaches.
    assert "last_hidden_state" in table[0] and table[0].endswith("ok")
    assert "pooler_output" in table[1] and "FAIL" in table[1]
    code, data = run_json("compare", broken, "-q")
    assert code == 1 and data["passed"] is False
    assert data["first_breach"]["onnx_tensor"] == "pooler_output"
    assert data["first_breach"]["max_rel_err"] > 0.1
    assert json.dumps(data)  # one JSON object on stdout, nothing else


def test_normwise_error_and_tolerances(artifacts: dict[str, Path]) -> None:
    result = compare(artifacts["tiny:gpt2"], batch=2, sequence=20)
    assert result.passed and (result.batch, result.sequence) == (2, 20)
    row = result.rows[0]
    assert row.rtol == 1e-4 and 0 < row.max_rel_err < 1e-5
    # The elementwise ratio is what Polygraphy reports: larger, because some logits are near 0.
    assert row.elementwise_max_rel_err >= row.max_rel_err
    tight = compare(artifacts["tiny:gpt2"], rtol=1e-12, atol=0.0)
    assert not tight.passed and tight.first_breach() is not None


def test_compare_an_engine_directory_uses_its_onnx(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engine"
    assert run_cli("build", artifacts["tiny:llama"], "-o", out, *CC, "-q").exit_code == 0
    code, data = run_json("compare", out, "-q")
    assert code == 0 and data["passed"]


def test_source_change_is_detected(tmp_path: Path) -> None:
    import torch
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    out = tmp_path / "onnx"
    assert run_cli("convert", model_dir, "-o", out, "-q").exit_code == 0
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    result = run_cli("compare", out)
    assert result.exit_code == 2 and "changed since it was converted" in result.stderr


def test_cache_outputs_are_one_summary_line_unless_verbose(artifacts: dict[str, Path]) -> None:
    """A decoder's present.* outputs (60 on SmolLM2) sum up in one line: count, worst error, verdict;
    -v lists them, and --json always holds every row."""
    plain = run_cli("compare", artifacts["tiny:llama"], "-q")
    assert plain.exit_code == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert not any("present.0.key" in line for line in lines), plain.stdout
    summary = [line for line in lines if "4 cache outputs" in line]
    assert len(summary) == 1 and summary[0].startswith("torch") and summary[0].endswith("ok"), plain.stdout
    assert any(line.startswith("torch") and " logits " in line for line in lines)
    assert lines[-1].startswith("PASS: logits max relative error")
    verbose = run_cli("compare", artifacts["tiny:llama"], "-v")
    assert verbose.exit_code == 0
    assert sum(" present." in line for line in verbose.stdout.splitlines()) == 4
    code, data = run_json("compare", artifacts["tiny:llama"], "-q")
    assert code == 0 and [r["output"] for r in data["results"]][1:] == [
        f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]


def test_a_count_of_one_takes_the_singular() -> None:
    row = OutputResult("torch", "ort", "y", [1], 0.0, 0.0, 0.0, 1e-4, 1e-4, True, cosine=1.0)
    result = CompareResult(["torch", "ort"], "y", 1, 1, rows=[row], marked=1, segments=1, skipped=["t"])
    text = result.render()
    assert "(1 marked tensor; graph run once, in 1 segment); 1 mark had no counterpart in every runner" in text
    two = CompareResult(["torch", "ort"], "y", 1, 1, rows=[row], marked=2, segments=2, skipped=["t", "u"])
    assert "(2 marked tensors; graph run once, in 2 segments); 2 marks had no counterpart" in two.render()
