"""LoRA adapters made with PEFT (random, B non-zero): merged at convert (`--lora`) and held in runtime
slots (`optimize --lora-slots`), each row's greedy tokens against PEFT's own model with that adapter;
and bad adapters, one line each."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from tests.conftest import CC, assert_clean_failure, run_cli, run_json
from tests.test_generate import NEW, hf_generate

PROMPTS = [[11, 57, 300, 8, 91], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [400, 3, 77], [9, 8, 7, 6, 5, 4, 3, 2]]
LINEAR = {
    "tiny:llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "tiny:gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: PEFT's fan_in_fan_out
    "tiny:qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

LAYERS = {"tiny:llama": 7, "tiny:gpt2": 4, "tiny:qwen3": 7}  # linear layers a layer (GPT-2: 2 c_proj)


def base_model(name: str) -> torch.nn.Module:
    return resolve_model(name).load(DType.FP32)


def peft_model(name: str, adapters: Sequence[Path]) -> torch.nn.Module:
    """PEFT's model with the adapters loaded (the first active)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(name), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval()


def make_adapter(name: str, out: Path, seed: int, rank: int = 4, **config: object) -> Path:
    """A PEFT LoRA adapter on `name`'s linear layers with random A and B (B non-zero), saved to `out`."""
    from peft import LoraConfig, get_peft_model

    settings: dict[str, object] = {"r": rank, "lora_alpha": 2 * rank, "target_modules": LINEAR[name]}
    settings.update(config)
    base = base_model(name)  # (a tiny model's load seeds torch's generator itself)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **settings))  # type: ignore[arg-type]
    with torch.no_grad():  # large enough to move the greedy tokens of a tiny random model
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(4.0)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per architecture: adapters a (rank 4) and b (rank 8, rsLoRA, alpha_pattern) on every linear layer."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, dict[str, Path]] = {}
    for name in LINEAR:
        short = name.split(":")[1]
        made[name] = {
            "a": make_adapter(name, root / f"{short}-a", 1),
            "b": make_adapter(
                name, root / f"{short}-b", 2, rank=8, use_rslora=True, alpha_pattern={LINEAR[name][0]: 3.0}
            ),
        }
    return made


@pytest.mark.parametrize("name", list(LINEAR))
def test_merged_tokens_equal_peft_merged(name: str, adapters: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, result = run_json("convert", name, "-o", out, "--lora", f"a={adapters[name]['a']}", "-q")
    assert code == 0, result
    merged = peft_model(name, [adapters[name]["a"]]).merge_and_unload()
    reference = hf_generate(merged, PROMPTS, pad=0)
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == reference
    # The adapter moves the tokens: without it they differ (the comparison above can fail).
    assert hf_generate(base_model(name), PROMPTS, pad=0) != reference
    record = Manifest.read(out).adapters
    assert [r.name for r in record] == ["a"] and record[0].rank == 4 and len(record[0].sha256) == 64
    assert f"adapter       a: rank 4, {LAYERS[name] * 2} layers" in run_cli("inspect", out).stdout
    assert len(record[0].modules) == LAYERS[name] * 2  # every linear layer of the 2 layers


def test_two_adapters_and_modules_to_save_merge_in_order(adapters: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """b after a, and an adapter that replaces the tied output head whole (modules_to_save)."""
    name = "tiny:llama"
    head = make_adapter(name, tmp_path / "head", 3, target_modules=["q_proj"], modules_to_save=["lm_head"])
    out = tmp_path / "merged"
    args = ["--lora", adapters[name]["a"], "--lora", adapters[name]["b"], "--lora", head]
    code, result = run_json("convert", name, "-o", out, *args, "-q")
    assert code == 0, result
    model = peft_model(name, [adapters[name]["a"], adapters[name]["b"], head])
    model.base_model.set_adapter(["a0", "a1", "a2"])  # every adapter at once, as merged
    merged = model.merge_and_unload()
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW))
    assert [row.new_ids for row in got.rows] == hf_generate(merged, PROMPTS, pad=0)
    assert [r.name for r in Manifest.read(out).adapters] == [adapters[name]["a"].name, adapters[name]["b"].name, "head"]


def _rewrite_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_bad_adapters_get_one_line_each(adapters: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    source = adapters["tiny:llama"]["a"]
    cases: list[tuple[str, str]] = []
    missing = tmp_path / "missing"
    cases.append((str(missing), "is not a directory"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(source / "adapter_config.json", no_weights)
    cases.append((str(no_weights), "no adapter_model.safetensors or adapter_model.bin"))
    dora = tmp_path / "dora"
    shutil.copytree(source, dora)
    _rewrite_config(dora, use_dora=True)
    cases.append((str(dora), "DoRA (use_dora) is not supported"))
    other = tmp_path / "ia3"
    shutil.copytree(source, other)
    _rewrite_config(other, peft_type="IA3")
    cases.append((str(other), "PEFT type 'IA3' is not supported"))
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases.append((str(truncated), "cannot read adapter_model.safetensors"))
    cases.append((str(adapters["tiny:gpt2"]["a"]), "the model has no layer transformer.h.0.attn.c_attn"))
    for i, (path, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert_clean_failure(run_cli("convert", "tiny:llama", "-o", out, "--lora", path), fragment, out)
    wrong_shape = tmp_path / "qwen3-on-llama"
    shutil.copytree(adapters["tiny:qwen3"]["a"], wrong_shape)
    out = tmp_path / "shape"
    result = run_cli("convert", "tiny:llama", "-o", out, "--lora", wrong_shape)
    assert_clean_failure(result, "(an adapter for another model?)", out)


def peft_rows(name: str, adapters: dict[str, Path], rows: Sequence[str | None]) -> list[list[int]]:
    """Each row's greedy tokens from PEFT with that row's adapter (None: the base model), alone."""
    model = peft_model(name, [adapters["a"], adapters["b"]])
    ids = {"a": "a0", "b": "a1"}
    out = []
    for prompt, adapter in zip(PROMPTS, rows, strict=True):
        if adapter is None:
            with model.disable_adapter():
                out += hf_generate(model, [prompt], pad=0)
        else:
            model.set_adapter(ids[adapter])
            out += hf_generate(model, [prompt], pad=0)
    return out


@pytest.mark.parametrize("name", list(LINEAR))
def test_runtime_slots_mix_adapters_in_a_batch(
    name: str, artifacts: dict[str, Path], adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    out = tmp_path / "slots"
    code, result = run_json("optimize", artifacts[name], "-o", out, "--lora-slots", "2", "--lora-max-rank", "8", "-q")
    assert code == 0, result
    assert result["numeric_check"]["passed"]  # no adapter: the base graph's outputs
    lora = next(p for p in result["passes"] if p["name"] == "lora")
    assert lora["counts"]["lora_layers"] == LAYERS[name] * 2
    assert f"lora slots    2 x rank 8 on {LAYERS[name] * 2} linear layers" in run_cli("inspect", out).stdout
    pair = adapters[name]
    rows = ["a", "b", None, "a"]
    values = [f"a={pair['a']}", f"b={pair['b']}", "none", "a"]
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW), adapters=values)
    reference = peft_rows(name, pair, rows)
    assert [row.new_ids for row in got.rows] == reference
    assert reference[0] != peft_rows(name, pair, [None, None, None, None])[0]  # the adapter moves the tokens
    # No adapter: the base model's tokens; one adapter for every row.
    assert [r.new_ids for r in generate(out, ids=PROMPTS, sampling=Sampling(NEW)).rows] == hf_generate(
        base_model(name), PROMPTS, pad=0
    )
    every = generate(out, ids=PROMPTS[:2], sampling=Sampling(NEW), adapters=[f"b={pair['b']}"])
    assert [r.new_ids for r in every.rows] == peft_rows(name, pair, ["b", "b", "b", "b"])[:2]


@pytest.mark.parametrize("name", list(LINEAR))
def test_runtime_slots_split_over_two_ranks(
    name: str, artifacts: dict[str, Path], adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """--tp 2: A cut like its layer's input, B like its output; each rank's partial path joins the sum."""
    out = tmp_path / "tp2"
    args = ["--lora-slots", "2", "--lora-max-rank", "8", "--tp", "2", "-q"]
    code, result = run_json("optimize", artifacts[name], "-o", out, *args)
    assert code == 0, result
    assert result["numeric_check"]["passed"]
    pair = adapters[name]
    values = [f"a={pair['a']}", f"b={pair['b']}", "none", "a"]
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW), adapters=values)
    assert [row.new_ids for row in got.rows] == peft_rows(name, pair, ["a", "b", None, "a"])
    rank = Manifest.read(out / "rank1").graph()
    assert rank.lora is not None
    shards = {t.module.rsplit(".", 1)[-1]: t.shard.weight for t in rank.lora.targets if t.shard}
    assert shards["c_fc" if name == "tiny:gpt2" else "o_proj"] == ("b" if name == "tiny:gpt2" else "a")


def test_lora_decoder_engine_builds_with_both_profiles(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """The adapters are engine inputs of static shape; the slot index spans the batch in both profiles."""
    source = tmp_path / "slots"
    code, result = run_json("optimize", artifacts["tiny:llama"], "-o", source, "--lora-slots", "4", "-q")
    assert code == 0, result
    code, compared = run_json("compare", source, "-q")  # empty slots: the base model's outputs
    assert code == 0 and compared["passed"], compared
    code, info = run_json("build", source, "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["profile_names"] == ["prefill", "decode"]
    for profile in info["optimization_profiles"]:  # the adapters' static shapes need no ranges
        assert profile["lora_slot"] == {"min": [1], "opt": [1], "max": [8]}
    # 14 layers and lm_head, and each low-rank path's two matrix multiplies
    assert info["layer_types"]["MATRIX_MULTIPLY"] == 15 + 2 * 14


SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_NEW = 16
SMOLLM2_PROMPTS = [[1, 504, 3458, 282, 4052, 314], [1, 2683, 253, 1380, 30, 216], [504, 2576, 7123, 281]]


def test_smollm2_rank16_adapter_tokens_equal_peft(smollm2_artifact: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    """A rank-16 adapter on q/k/v/o and the MLP of a real model, in runtime slots (the merged path is
    the tiny models'; this keeps the suite's time)."""
    from peft import LoraConfig, get_peft_model

    model = resolve_model(str(smollm2_gguf)).load(DType.FP32)
    torch.manual_seed(7)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS, init_lora_weights=False)
    peft = get_peft_model(model, config).eval()
    peft.save_pretrained(str(tmp_path / "adapter"))
    reference = [hf_generate(peft, [p], pad=0, new=SMOLLM2_NEW)[0] for p in SMOLLM2_PROMPTS]
    with peft.disable_adapter():
        assert reference != [hf_generate(peft, [p], pad=0, new=SMOLLM2_NEW)[0] for p in SMOLLM2_PROMPTS]
    slots = tmp_path / "slots"
    code, result = run_json("optimize", smollm2_artifact, "-o", slots, "--lora-slots", "2", "--no-check", "-q")
    assert code == 0, result
    adapter = [str(tmp_path / "adapter")]
    got = generate(slots, ids=SMOLLM2_PROMPTS, sampling=Sampling(SMOLLM2_NEW), adapters=adapter)
    assert [row.new_ids for row in got.rows] == reference


def test_bad_runtime_adapters_get_one_line_each(
    artifacts: dict[str, Path], adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    slots = tmp_path / "slots"
    args = ["--lora-slots", "1", "--lora-max-rank", "4", "--lora-targets", "q_proj", "--lora-targets", "v_proj"]
    code, result = run_json("optimize", artifacts["tiny:llama"], "-o", slots, *args, "-q")
    assert code == 0, result
    narrow = make_adapter("tiny:llama", tmp_path / "narrow", 5, target_modules=["q_proj"])
    other = make_adapter("tiny:llama", tmp_path / "other", 6, target_modules=["q_proj"])
    wide = make_adapter("tiny:llama", tmp_path / "wide", 7, rank=8, target_modules=["q_proj"])
    foreign = make_adapter("tiny:qwen3", tmp_path / "foreign", 8, target_modules=["q_proj"])
    cases = [
        ([str(wide)], "rank 8 at model.layers.0.self_attn.q_proj is over the slots' maximum 4"),
        ([str(adapters["tiny:llama"]["a"])], "model.layers.0.mlp.down_proj has no LoRA slot in this graph"),
        ([str(tmp_path / "nowhere")], "is not a directory"),
        ([f"x={narrow}", f"y={other}"], "2 adapters do not fit this graph's 1 LoRA slots"),
        ([str(foreign)], "the base layer is 64 -> 64"),
        ([str(narrow)] * 3, "give one for every prompt or one per prompt (2), not 3"),
    ]
    for values, fragment in cases:
        flags = [x for v in values for x in ("--adapter", v)]
        result = run_cli("generate", slots, "--ids", "1,2,3", "--ids", "4,5", *flags, "--max-new-tokens", "2")
        assert_clean_failure(result, fragment)
    result = run_cli("generate", artifacts["tiny:llama"], "--ids", "1,2,3", "--adapter", narrow)
    assert_clean_failure(result, "this artifact has no LoRA slots")
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", tmp_path / "pp", "--lora-slots", "2", "--pp", "2")
    assert_clean_failure(result, "--lora-slots with --pp is not built yet", tmp_path / "pp")
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", tmp_path / "t", "--lora-targets", "q_proj")
    assert_clean_failure(result, "--lora-targets goes with --lora-slots N", tmp_path / "t")
    flags = ["--lora-slots", "1", "--lora-targets", "nothing_proj"]
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", tmp_path / "t", *flags)
    assert_clean_failure(result, "--lora-slots: no linear layer matches nothing_proj", tmp_path / "t")
    # A name given once is reused: both rows share the one slot, as with the folder given for each.
    named = generate(slots, ids=PROMPTS[:2], sampling=Sampling(8), adapters=[f"n={narrow}", "n"])
    both = generate(slots, ids=PROMPTS[:2], sampling=Sampling(8), adapters=[str(narrow)])
    assert [r.new_ids for r in named.rows] == [r.new_ids for r in both.rows]


@pytest.mark.parametrize("form", ["fixed", "gqa"])
def test_runtime_slots_in_the_buffer_cache_forms(
    form: str, artifacts: dict[str, Path], adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """The slots go in before the cache passes: the fixed buffer and the gqa form take them too."""
    out = tmp_path / form
    args = ["--lora-slots", "2", "--lora-max-rank", "8", "--kv-form", form, "-q"]
    code, result = run_json("optimize", artifacts["tiny:llama"], "-o", out, *args)
    assert code == 0, result
    pair = adapters["tiny:llama"]
    got = generate(out, ids=PROMPTS, sampling=Sampling(NEW), adapters=[f"a={pair['a']}", "none", f"b={pair['b']}", "a"])
    assert [row.new_ids for row in got.rows] == peft_rows("tiny:llama", pair, ["a", None, "b", "a"])
