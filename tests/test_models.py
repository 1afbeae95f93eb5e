"""Model sources: a model id resolved from the local Hugging Face cache (offline, symlinked blobs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import transformers

from llm2trt.core.manifest import Manifest
from tests.conftest import assert_clean_failure, run_cli, run_json


def fake_hub_cache(cache: Path, model_id: str, files: Path, revision: str = "0123abcd") -> Path:
    """The hub's layout: blobs named by hash, snapshots/<rev>/ of symlinks into them, refs/main."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_model_id_is_resolved_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "saved"))
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-gpt2", tmp_path / "saved")
    assert (snapshot / "model.safetensors").is_symlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "onnx"
    code, result = run_json("convert", "acme/tiny-gpt2", "-o", out, "-q")
    assert code == 0, result
    manifest = Manifest.read(out)
    assert manifest.source.kind == "hf" and manifest.source.location == str(snapshot)
    code, compared = run_json("compare", out, "-q")
    assert code == 0 and compared["main_max_rel_err"] < 1e-4


def test_an_id_not_in_the_cache_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "onnx"
    result = run_cli("convert", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "-o", out)
    assert_clean_failure(result, "'TinyLlama/TinyLlama-1.1B-Chat-v1.0' is neither a path nor in the local", out)
    assert "llm2trt never downloads" in result.stderr
