"""generate: greedy tokens identical to transformers' own `generate`, for every cache form kept,
the KV-cache insertion pass and the fused graphs; sampling; bad input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2trt.convert.sources import resolve_model, source_from_info
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.exporters import get_spec
from llm2trt.generate.driver import generate
from tests.conftest import assert_clean_failure, run_cli, run_json

NEW = 32
# Gemma 3's tiny config slides a 6-token window over some layers (shorter than the prompts plus the new
# tokens); Qwen3's head size is not hidden / heads; Phi-3's LongRoPE switches factors past 32 positions;
# BLOOM has ALiBi and no position_ids.
TINY_DECODERS = ["tiny:gpt2", "tiny:llama", "tiny:qwen3", "tiny:gemma3", "tiny:phi3", "tiny:bloom"]
# The cache forms and how an artifact gets them: the exporter's growing cache, the same fused,
# a fixed buffer, and a cache inserted into a cache-less export (growing and fixed).
FORMS = {
    "growing": [],
    "growing-fused": [["optimize"]],
    "fixed-fused": [["optimize", "--kv-form", "fixed"]],
    "inserted": [["optimize", "--kv-cache"]],
    "inserted-fixed": [["optimize", "--kv-cache", "--kv-form", "fixed"]],
    "gqa-fused": [["optimize", "--kv-form", "gqa"]],  # ONNX Runtime's GroupQueryAttention decoder
}


def hf_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad: int, new: int = NEW) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch; new ids per row, cut after the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


def make(form: str, base: Path, root: Path, name: str) -> Path:
    """The artifact of one cache form, from a cached (`base`) or cache-less export."""
    if form.startswith("inserted"):
        source = root / f"{name}-nocache"
        if not source.exists():
            assert run_cli("convert", f"tiny:{name}", "-o", source, "--no-kv-cache", "-q").exit_code == 0
    else:
        source = base
    out = source
    for step in FORMS[form]:
        target = root / f"{name}-{form}"
        result = run_cli(step[0], out, "-o", target, *step[1:], "-q")
        assert result.exit_code == 0, result.stderr
        out = target
    return out


@pytest.fixture(scope="module")
def tiny_prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 1000, size=n).tolist() for n in (5, 11, 3, 8)]


def _form_of(form: str) -> str:
    return "fixed" if "fixed" in form else "gqa" if "gqa" in form else "growing"


def _forms_of(name: str) -> tuple[str, ...]:
    spec = get_spec(name[5:])
    return spec.kv_forms_for(spec.make_tiny_config())


# Every cache form each architecture's graphs can take (BLOOM: growing only, get_spec says why).
CASES = [(name, form) for name in TINY_DECODERS for form in FORMS if _form_of(form) in _forms_of(name)]


@pytest.mark.parametrize(("name", "form"), CASES)
def test_tiny_greedy_tokens_match_transformers(
    name: str,
    form: str,
    artifacts: dict[str, Path],
    tiny_prompts: list[list[int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    artifact = make(form, artifacts[name], tmp_path_factory.mktemp("forms"), name.split(":")[1])
    manifest = Manifest.read(artifact)
    want = _form_of(form)
    assert manifest.kv_cache is not None and manifest.kv_cache.form == want
    model = resolve_model(name).load(DType.FP32)
    reference = hf_generate(model, tiny_prompts, pad=0)
    batch = generate(artifact, ids=tiny_prompts, sampling=Sampling(NEW))
    assert [row.new_ids for row in batch.rows] == reference
    assert all(len(r) == NEW for r in reference)  # no early EOS: all 32 tokens compared
    single = generate(artifact, ids=[tiny_prompts[1]], sampling=Sampling(NEW))
    assert single.rows[0].new_ids == hf_generate(model, [tiny_prompts[1]], pad=0)[0]
    assert single.rows[0].ids == tiny_prompts[1] + single.rows[0].new_ids
    # One-token prompts: a prefill as wide as a decode step.
    ones = generate(artifact, ids=[[7], [5]], sampling=Sampling(8))
    assert [row.new_ids for row in ones.rows] == hf_generate(model, [[7], [5]], pad=0, new=8)


# Shared with scripts/gpu_tokens.py, which asks the same of the fp16 artifact on a GPU.
SMOL_PROMPTS = (Path(__file__).parent / "data" / "smollm2_prompts.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def smollm2_forms(
    smollm2_artifact: Path, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol-forms")
    forms = {"growing": smollm2_artifact}
    for form, args in (("growing-fused", []), ("fixed-fused", ["--kv-form", "fixed"]), ("gqa", ["--kv-form", "gqa"])):
        assert run_cli("optimize", smollm2_artifact, "-o", root / form, *args, "-q").exit_code == 0
        forms[form] = root / form
    assert run_cli("convert", smollm2_gguf, "-o", root / "nocache", "--no-kv-cache", "-q").exit_code == 0
    assert run_cli("optimize", root / "nocache", "-o", root / "inserted", "--kv-cache", "-q").exit_code == 0
    forms["inserted"] = root / "inserted"
    return forms


@pytest.mark.xdist_group("smollm2_forms")  # one worker builds the forms once
def test_smollm2_greedy_tokens_match_transformers(smollm2_forms: dict[str, Path]) -> None:
    manifest = Manifest.read(smollm2_forms["growing"])
    assert manifest.generation is not None and manifest.generation.tokenizer == "tokenizer"
    assert manifest.generation.eos_token_ids == [2] and manifest.generation.chat_template
    from llm2trt.convert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_forms["growing"], manifest)
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in SMOL_PROMPTS]
    model = source_from_info(manifest.source).load(DType.FP32)
    reference = [hf_generate(model, [p], pad=2)[0] for p in prompts]  # each prompt alone, unpadded
    assert sum(len(r) for r in reference) >= 4 * NEW  # (at most one stops early, at EOS)
    for form, artifact in smollm2_forms.items():
        got = generate(artifact, prompts=SMOL_PROMPTS, sampling=Sampling(NEW))  # all five in one batch
        assert [row.new_ids for row in got.rows] == reference, form
    assert got.rows[0].text.startswith(" Paris")


def test_a_growing_cache_can_start_from_a_masked_dummy_slot(
    artifacts: dict[str, Path], tiny_prompts: list[list[int]]
) -> None:
    """What the TensorRT runtime does (its profiles have no zero-length past): same tokens."""
    from llm2trt.backends.decoder import GrowingSession
    from llm2trt.backends.onnxruntime.decoder import ort_executor

    manifest = Manifest.read(artifacts["tiny:llama"])
    graph = manifest.graph()
    run = ort_executor(str(manifest.onnx_path(artifacts["tiny:llama"], graph.name)))
    plain, dummy = GrowingSession(graph, run), GrowingSession(graph, run, dummy_slot=True)
    picks = []
    for session in (plain, dummy):
        tokens = np.argmax(session.prefill(tiny_prompts), -1)
        steps = [tokens]
        for _ in range(8):
            tokens = np.argmax(session.decode(tokens), -1)
            steps.append(tokens)
        picks.append(np.stack(steps))
    assert np.array_equal(picks[0], picks[1])
    assert (
        dummy.state.cache["past_key_values.0.key"].shape[2] == plain.state.cache["past_key_values.0.key"].shape[2] + 1
    )


def test_sampling_is_seeded(artifacts: dict[str, Path]) -> None:
    sampled = [
        generate(artifacts["tiny:llama"], ids=[[5, 6, 7]], sampling=Sampling(16, 1.0, 50, 0.9, seed)).rows[0].new_ids
        for seed in (1, 1, 2)
    ]
    greedy = generate(artifacts["tiny:llama"], ids=[[5, 6, 7]], sampling=Sampling(16)).rows[0].new_ids
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and sampled[0] != greedy


def test_pick_respects_top_k_and_top_p() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    top1 = Sampling(4, temperature=1.0, top_k=1).picker()
    assert {int(top1(logits)[0]) for _ in range(20)} == {0}
    nucleus = Sampling(4, temperature=1.0, top_p=0.7, seed=3).picker()  # 0.5 + 0.3 reach 0.7
    assert {int(nucleus(logits)[0]) for _ in range(200)} == {0, 1}


def test_cli_json_and_text(artifacts: dict[str, Path]) -> None:
    code, data = run_json("generate", artifacts["tiny:gpt2"], "--ids", "4,5,6", "--max-new-tokens", "5", "-q")
    assert code == 0 and data["ids"][:3] == [4, 5, 6] and len(data["ids"]) == 8
    assert data["text"] is None and data["results"][0]["stop"] == "length" and data["runner"] == "ort"
    text = run_cli("generate", artifacts["tiny:gpt2"], "--ids", "4,5,6", "--ids", "9", "--max-new-tokens", "3", "-q")
    assert text.exit_code == 0 and text.stdout.startswith("[0] ") and "\n[1] " in text.stdout


def test_bad_input(artifacts: dict[str, Path], tmp_path: Path) -> None:
    tiny = artifacts["tiny:llama"]
    assert_clean_failure(run_cli("generate", artifacts["tiny:bert"], "--ids", "1,2"), "generate needs a decoder")
    assert_clean_failure(run_cli("generate", tiny, "--prompt", "hello"), "has no tokenizer (tiny models have none)")
    assert_clean_failure(run_cli("generate", tiny, "--prompt", "a", "--ids", "1"), "not both")
    assert_clean_failure(run_cli("generate", tiny, "--ids", "1,x"), "--ids takes comma-separated token ids")
    long = ",".join(["7"] * 250)
    assert_clean_failure(
        run_cli("generate", tiny, "--ids", long, "--max-new-tokens", "10"),
        "needs 260 positions; this artifact holds 256",
    )
    out = tmp_path / "nocache"
    assert run_cli("convert", "tiny:llama", "-o", out, "--no-kv-cache", "-q").exit_code == 0
    assert_clean_failure(run_cli("generate", out, "--ids", "1,2"), "this artifact has no KV cache")
    assert_clean_failure(run_cli("optimize", out, "-o", tmp_path / "x", "--kv-form", "fixed"), "add --kv-cache")
    result = run_cli("optimize", tiny, "-o", tmp_path / "y", "--kv-cache")
    assert_clean_failure(result, "already has KV-cache I/O", tmp_path / "y")
    result = run_cli("optimize", artifacts["tiny:bert"], "-o", tmp_path / "z", "--kv-cache")
    assert_clean_failure(result, "bert is not a decoder", tmp_path / "z")


def _zen(tmp_path: Path) -> Path:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    path = tmp_path / "zen.txt"
    path.write_text(codecs.decode(this.s, "rot13"))
    return path


@pytest.mark.xdist_group("smollm2_forms")
def test_smollm2_perplexity_matches_transformers(smollm2_forms: dict[str, Path], tmp_path: Path) -> None:
    """eval ppl on every cache form equals transformers' own loss over the same windows."""
    from llm2trt.convert.tokenizer import load_tokenizer, windows_of

    text = _zen(tmp_path)
    manifest = Manifest.read(smollm2_forms["growing"])
    ids = load_tokenizer(smollm2_forms["growing"], manifest)(text.read_text(), add_special_tokens=False).input_ids
    model = source_from_info(manifest.source).load(DType.FP32)
    total, scored = 0.0, 0
    with torch.no_grad():
        for window in windows_of(ids, 64):
            loss = model(input_ids=torch.tensor([window]), labels=torch.tensor([window])).loss
            total, scored = total + float(loss) * (len(window) - 1), scored + len(window) - 1
    reference = float(np.exp(total / scored))
    assert 10 < reference < 60 and scored == len(ids) - 4  # 4 windows, each scores all but its first
    for form, artifact in smollm2_forms.items():
        code, got = run_json("eval", "ppl", artifact, "--text", text, "--window", "64")
        assert code == 0 and got["windows"] == 4 and got["scored"] == scored, form
        assert abs(got["ppl"] / reference - 1) < 1e-4, (form, got["ppl"], reference)


def test_eval_ppl_bad_input(artifacts: dict[str, Path], smollm2_artifact: Path, tmp_path: Path) -> None:
    text = _zen(tmp_path)
    assert_clean_failure(run_cli("eval", "ppl", artifacts["tiny:llama"], "--text", text), "has no tokenizer")
    assert_clean_failure(run_cli("eval", "ppl", artifacts["tiny:bert"], "--text", text), "needs a decoder")
    missing = tmp_path / "none.txt"
    assert_clean_failure(run_cli("eval", "ppl", smollm2_artifact, "--text", missing), "no text file")
    (tmp_path / "one.txt").write_text("Hi")
    assert_clean_failure(run_cli("eval", "ppl", smollm2_artifact, "--text", tmp_path / "one.txt"), "fewer than 2")


def test_smollm2_chat_prompt_through_the_cli(smollm2_artifact: Path) -> None:
    """--chat wraps the prompt in the model's template (transformers 5's apply_chat_template returns a
    BatchEncoding, not ids) and generates from there."""
    from llm2trt.convert.tokenizer import load_tokenizer

    prompt = "Write a haiku about rivers"
    code, data = run_json("generate", smollm2_artifact, "--chat", "--prompt", prompt, "--max-new-tokens", "8", "-q")
    assert code == 0, data
    tokenizer = load_tokenizer(smollm2_artifact, Manifest.read(smollm2_artifact), fast=False)  # transformers'
    # The template as text, tokenized here: what the ids must start with.
    turn = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and prompt in text
    template = tokenizer(text, add_special_tokens=False).input_ids
    row = data["results"][0]
    assert data["ids"][: len(template)] == template and row["ids"] == template + row["new_ids"]
    assert 1 <= len(row["new_ids"]) <= 8 and data["text"].strip()
    assert all(isinstance(i, int) for i in data["ids"])


def test_a_perplexity_over_one_window_says_window() -> None:
    from llm2trt.generate.evaluate import Perplexity

    one = Perplexity(ppl=2.0, tokens=5, windows=1, scored=4, nll=0.69, window=512, provider="cpu", seconds=0.1)
    assert "over 4 scored tokens (5 tokens, 1 window of up to 512;" in one.render()
    single = Perplexity(ppl=2.0, tokens=2, windows=1, scored=1, nll=0.69, window=512, provider="cpu", seconds=0.1)
    assert "over 1 scored token (2 tokens, 1 window of" in single.render()


def test_provider_cuda_never_falls_back_to_the_cpu_quietly(artifacts: dict[str, Path]) -> None:
    """--provider cuda runs on the CUDA provider or says it cannot (ONNX Runtime alone would fall back
    to the CPU without a word): for generate and for serve."""
    import onnxruntime as ort

    args = ("--provider", "cuda")
    result = run_cli("generate", artifacts["tiny:llama"], "--ids", "1,2", "--max-new-tokens", "2", *args)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert result.exit_code == 0, result.stderr
        return
    missing = "this ONNX Runtime has no CUDAExecutionProvider"
    assert_clean_failure(result, missing)
    assert_clean_failure(run_cli("serve", artifacts["tiny:llama"], *args), missing)
