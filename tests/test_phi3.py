"""Phi-3 (tiny:phi3: q/k/v in one qkv_proj, gate and up in one gate_up_proj, LongRoPE whose factors
switch past 32 positions) through optimize, its cache forms and --tp 2.

Greedy tokens are compared with transformers' own generate, which for Phi-3 drops its cache and
runs the whole sequence again when it first grows past original_max_position_embeddings (every
position then rotates by the long factors); the prompts plus 32 new tokens cross that point."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import transformers

from llm2trt.backends.decoder import DecoderSession
from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.sampling import Sampling
from llm2trt.exporters.phi3 import Phi3Spec
from llm2trt.generate.driver import generate, generate_ids
from tests.conftest import assert_clean_failure, run_cli, run_json
from tests.test_generate import hf_generate

NEW = 32
SWITCH = 32  # the tiny config's original_max_position_embeddings
# Prefixes of one sequence: the 11-token row reaches 33 tokens at its 22nd new one.
PROMPTS = [np.random.default_rng(0).integers(3, 1000, size=n).tolist() for n in (5, 11, 3, 8)]
FUSED = {"Attention": 2, "RMSNorm": 5, "RoPE": 4}  # 2 layers: per layer 1, 2 (+1 final) and 2
FORMS = {"growing": [], "growing-fused": ["optimize"], "fixed-fused": ["optimize", "--kv-form", "fixed"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phi3")


@pytest.fixture(scope="module")
def phi3(root: Path) -> Path:
    assert run_cli("convert", "tiny:phi3", "-o", root / "phi3", "-q").exit_code == 0
    return root / "phi3"


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return hf_generate(resolve_model("tiny:phi3").load(DType.FP32), PROMPTS, pad=0, new=NEW)


def _optimized(source: Path, out: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    if not out.exists():
        result = run_cli("optimize", source, "-o", out, *args, "-q")
        assert result.exit_code == 0, result.stderr
    return out, json.loads((out / "report.json").read_text())


def _tokens(artifact: Path, prompts: Sequence[Sequence[int]] = PROMPTS) -> list[list[int]]:
    return [r.new_ids for r in generate(artifact, ids=prompts, sampling=Sampling(NEW)).rows]


@pytest.mark.parametrize("kv_form", ["growing", "fixed"])
def test_every_rope_fuses(phi3: Path, root: Path, kv_form: str) -> None:
    out, report = _optimized(phi3, root / f"fused-{kv_form}", "--kv-form", kv_form)
    assert {k: v for k, v in report["fusions"].items() if v} == FUSED and report["missing"] == []
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    producers = {o: n for n in proto.graph.node for o in n.output}
    ropes = [n for n in proto.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 4
    # The slice bounds folded (cos.shape[-1], x.shape[-1] // 2): every Slice left has constant
    # bounds, and q and k rotate whole, straight from their head transposes (the slice that keeps
    # all of them and the Concat with the empty pass-through part are gone).
    constants = {t.name for t in proto.graph.initializer}
    slices = [n for n in proto.graph.node if n.op_type == "Slice"]
    assert slices and all(set(n.input[1:]) <= constants for n in slices)
    assert not [n.name for n in proto.graph.node if n.op_type in ("Div", "Neg")]
    assert all(producers[r.input[0]].op_type == "Transpose" for r in ropes)
    q_ropes = {r.output[0] for r in ropes}
    assert all(n.input[0] in q_ropes for n in proto.graph.node if n.op_type == "Attention")


@pytest.mark.parametrize("form", list(FORMS))
def test_greedy_tokens_match_transformers_past_the_switch(
    phi3: Path, root: Path, reference: list[list[int]], form: str
) -> None:
    artifact = phi3 if not FORMS[form] else _optimized(phi3, root / form, *FORMS[form][1:])[0]
    assert max(map(len, PROMPTS)) + NEW > SWITCH + 1
    assert _tokens(artifact) == reference


def test_gqa_form_is_refused(phi3: Path, root: Path) -> None:
    out = root / "gqa"
    assert_clean_failure(
        run_cli("optimize", phi3, "-o", out, "--kv-form", "gqa"),
        "phi3 has no graph with a gqa KV cache: LongRoPE rotates by factors chosen from the longest position",
        out,
    )


@pytest.mark.parametrize("kv_form", ["growing", "fixed"])
def test_tp2_gives_transformers_tokens(phi3: Path, root: Path, reference: list[list[int]], kv_form: str) -> None:
    out = root / f"tp2-{kv_form}"
    code, result = run_json("optimize", phi3, "-o", out, "--tp", "2", "--kv-form", kv_form, "-q")
    assert code == 0, result
    assert result["numeric_check"]["passed"] and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5
    for report in result["ranks"]:
        # Per layer: q, k and v out of qkv_proj, gate and up out of gate_up_proj.
        assert report["counts"]["narrowed_slices"] == 2 * 5
        assert report["counts"]["column"] == report["counts"]["row"] == 4
        assert report["kv_heads"] == 1 and {k: v for k, v in report["fusions"].items() if v} == FUSED
    assert _tokens(out) == reference


def test_partial_rotary_fuses_and_matches(root: Path) -> None:
    # Phi-4-mini rotates 3/4 of each head: q_rot = q[..., :rotary_dim] fuses, q_pass is concatenated.
    config = dict(Phi3Spec.tiny_config)
    rope = dict(config["rope_parameters"], partial_rotary_factor=0.5)
    rope["short_factor"], rope["long_factor"] = rope["short_factor"][:4], rope["long_factor"][:4]
    transformers.set_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**config, "rope_parameters": rope})).eval()
    model.save_pretrained(str(root / "partial-hf"))
    assert run_cli("convert", root / "partial-hf", "-o", root / "partial", "-q").exit_code == 0
    out, report = _optimized(root / "partial", root / "partial-fused")
    assert {k: v for k, v in report["fusions"].items() if v} == FUSED
    with torch.no_grad():
        assert _tokens(out) == hf_generate(model, PROMPTS, pad=0, new=NEW)


def test_refill_length_is_longrope_only() -> None:
    spec = Phi3Spec()
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 4096}
    assert spec.cache_refill_length({"rope_parameters": longrope, "original_max_position_embeddings": 4096}) == 4097
    assert spec.cache_refill_length({"rope_scaling": {"type": "longrope"}, "original_max_position_embeddings": 8}) == 9
    assert spec.cache_refill_length({"rope_parameters": {"rope_type": "default"}}) is None
    assert spec.cache_refill_length({"rope_scaling": None, "original_max_position_embeddings": 4096}) is None


class _Recorder(DecoderSession):
    """Logits that pick token 6 + the number of calls (7 first); records what it was fed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _logits(self, rows: int) -> np.ndarray:  # type: ignore[override]
        logits = np.zeros((rows, 100), dtype=np.float32)
        logits[:, 6 + len(self.calls)] = 1
        return logits

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        self.calls.append(("prefill", [list(p) for p in prompts]))
        return self._logits(len(prompts))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self.calls.append(("decode", tokens.tolist()))
        return self._logits(len(tokens))


def test_generate_runs_the_whole_sequence_again_where_transformers_does() -> None:
    # Prompts of 3 and 2 (padded width 3); the refill comes when 6 tokens are in: 3 fed after them.
    session = _Recorder()
    new, _, _ = generate_ids(session, [[1, 2, 3], [4, 5]], Sampling(6), [], refill_at=6)
    assert [kind for kind, _ in session.calls] == ["prefill", "decode", "decode", "prefill", "decode", "decode"]
    assert session.calls[3][1] == [[1, 2, 3, 7, 8, 9], [4, 5, 7, 8, 9]]  # the prompts and every token fed
    assert new == [[7, 8, 9, 10, 11, 12]] * 2
    # Prompts already past the point, or a model without one: never.
    for prompts, at in (([[1, 2, 3, 4, 5, 6]], 6), ([[1, 2, 3]], None)):
        session = _Recorder()
        generate_ids(session, prompts, Sampling(6), [], refill_at=at)
        assert [kind for kind, _ in session.calls].count("prefill") == 1
