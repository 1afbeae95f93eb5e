"""Real checkpoint layouts: sharded safetensors, .bin (single and sharded, loaded weights-only),
the Hugging Face cache's symlinked snapshots, tied embeddings, and configs that point at custom
code. Every converted artifact's logits are checked twice: by `llm2trt compare` (its own reload of
the source) and against the in-memory transformers model the checkpoint was written from, so a
loader that silently dropped a shard (random-initialized weights) could not pass."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llm2trt.convert.export import export_module
from llm2trt.core.manifest import Manifest
from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.exporters.llama import LlamaSpec
from tests.conftest import assert_clean_failure, run_cli, run_json

RTOL = 1e-4  # fp32
HIDDEN, VOCAB = LlamaSpec.tiny_config["hidden_size"], LlamaSpec.tiny_config["vocab_size"]
EMBED_BYTES = HIDDEN * VOCAB * 4


def tiny_llama(seed: int = 0, **overrides: Any) -> transformers.LlamaForCausalLM:
    """A random tiny Llama (GQA, hidden 64, 2 layers, vocab 1000), fp32, eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**LlamaSpec.tiny_config, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def save_bin(model: torch.nn.Module, directory: Path, shards: int = 1) -> list[Path]:
    """The pre-safetensors layout: pytorch_model.bin, or N pytorch_model-0000i-of-0000N.bin shards
    with pytorch_model.bin.index.json (transformers 5 no longer writes .bin, so torch.save does)."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(str(directory))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return [directory / "pytorch_model.bin"]
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map, files = {}, []
    for i, group in enumerate(groups, 1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in group}, directory / name)
        weight_map.update(dict.fromkeys(group, name))
        files.append(directory / name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return files


def save_tokenizer(directory: Path) -> None:
    """A small word-level tokenizer (tokenizer.json + tokenizer_config.json), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w2")
    tokenizer.save_pretrained(str(directory))


def fake_hub_cache(cache: Path, model_id: str, files: Path, revision: str = "0123abcd" * 5) -> Path:
    """The hub's layout: blobs named by hash, snapshots/<rev>/ of relative symlinks into them, refs/main."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in sorted(files.iterdir()):
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def data_bytes(out: Path) -> int:
    """Bytes of the artifact's external data files."""
    manifest = Manifest.read(out)
    return sum((out / name).stat().st_size for name in manifest.graph().external_data)


def logits_error(out: Path, model: torch.nn.Module) -> float:
    """Normwise relative error of the artifact's logits (ONNX Runtime) against `model`, the
    transformers model held in memory since before its checkpoint was written."""
    manifest = Manifest.read(out)
    graph = manifest.graph()
    feeds = LlamaSpec().sample_inputs(model.config, graph, batch=2, sequence=9, seed=3)
    got = run_ort(manifest.onnx_path(out), feeds)[graph.main_output]
    wrapper = export_module(model, graph, dict(LlamaSpec.forward_kwargs))
    with torch.no_grad():
        want = wrapper(*[torch.from_numpy(feeds[t.name]) for t in graph.inputs])[0].numpy()
    assert got.shape == want.shape == (2, 9, VOCAB)
    return normwise_rel_err(got, want)


def convert_and_check(model_arg: str | Path, out: Path, model: torch.nn.Module) -> tuple[float, float]:
    """Convert, then (compare's error, the error against the in-memory model); both within fp32 tolerance."""
    code, result = run_json("convert", model_arg, "-o", out, "-q")
    assert code == 0, result
    code, compared = run_json("compare", out, "-q")
    assert code == 0 and compared["passed"], compared
    independent = logits_error(out, model)
    assert compared["main_max_rel_err"] <= RTOL and independent <= RTOL, (compared["main_max_rel_err"], independent)
    return compared["main_max_rel_err"], independent


@pytest.fixture(scope="module")
def untied() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def sharded_artifact(untied: transformers.LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untied model as 4 safetensors shards with an index, converted (shared by a. and d.)."""
    root = tmp_path_factory.mktemp("sharded")
    untied.save_pretrained(str(root / "hf"), max_shard_size="200KB")
    shards = sorted((root / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) == 4 and (root / "hf" / "model.safetensors.index.json").is_file()
    assert not (root / "hf" / "model.safetensors").exists()
    convert_and_check(root / "hf", root / "onnx", untied)
    return root / "onnx"


def test_loading_weights_draws_no_progress_bar(untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    """transformers' weight-loading bar is noise between llm2trt's own step lines (and in a log file
    a run of carriage returns): the console script keeps it off unless -v."""
    import subprocess
    import sys

    untied.save_pretrained(str(tmp_path / "hf"))
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    exe = Path(sys.executable).parent / "llm2trt"
    proc = subprocess.run(
        [str(exe), "convert", str(tmp_path / "hf"), "-o", str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("[llm2trt] ")] == [], proc.stderr


# -- a. sharded safetensors ----------------------------------------------------------------------


def test_sharded_safetensors(sharded_artifact: Path, untied: transformers.LlamaForCausalLM) -> None:
    error = logits_error(sharded_artifact, untied)
    assert error <= RTOL, error
    source = Manifest.read(sharded_artifact).source
    # Every shard and the index are hashed: changing one shard is caught by compare.
    hf = Path(source.location)
    shard = sorted(hf.glob("model-*-of-*.safetensors"))[-1]
    original = shard.read_bytes()
    try:
        tensors = load_file(str(shard))
        save_file({k: v * 1.5 for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
        result = run_cli("compare", sharded_artifact)
        assert result.exit_code == 2 and "changed since it was converted" in result.stderr
    finally:
        shard.write_bytes(original)


def test_a_missing_shard_is_one_line(untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    untied.save_pretrained(str(tmp_path / "hf"), max_shard_size="200KB")
    (tmp_path / "hf" / "model-00002-of-00004.safetensors").unlink()
    out = tmp_path / "onnx"
    result = run_cli("convert", tmp_path / "hf", "-o", out)
    assert_clean_failure(result, "model-00002-of-00004.safetensors", out)
    assert result.exit_code == 2


def test_a_checkpoint_without_one_weight_is_one_line(untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    """transformers fills a weight the files lack with random values and only logs it: refused."""
    untied.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "onnx"
    result = run_cli("convert", tmp_path / "hf", "-o", out)
    assert_clean_failure(result, "lacks the weight model.layers.1.mlp.up_proj.weight", out)


# -- b. .bin weights, loaded weights-only ----------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_weights(shards: int, untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    files = save_bin(untied, tmp_path / "hf", shards)
    assert len(files) == shards and not list((tmp_path / "hf").glob("*.safetensors"))
    convert_and_check(tmp_path / "hf", tmp_path / "onnx", untied)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("form", ["torch.save", "legacy pickle", "second shard"])
def test_malicious_pickle_is_refused(form: str, untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    hf = tmp_path / "hf"
    payload = {"model.embed_tokens.weight": _RunsCode(marker)}
    if form == "second shard":
        save_bin(untied, hf, shards=3)
        torch.save(payload, hf / "pytorch_model-00002-of-00003.bin")
    else:
        hf.mkdir()
        untied.config.save_pretrained(str(hf))
        if form == "torch.save":
            torch.save(payload, hf / "pytorch_model.bin")
        else:
            with open(hf / "pytorch_model.bin", "wb") as fh:
                pickle.dump(payload, fh, protocol=2)
    out = tmp_path / "onnx"
    result = run_cli("convert", hf, "-o", out)
    assert_clean_failure(result, "refusing to unpickle", out)
    assert result.exit_code == 2
    assert "posix.system" in result.stderr  # names what it would have called
    assert "weights_only=False" not in result.stderr  # torch's advice to do so is not passed on
    assert not marker.exists()
    # Control: the file really runs code when unpickled without weights_only.
    evil = "pytorch_model-00002-of-00003.bin" if form == "second shard" else "pytorch_model.bin"
    if form == "legacy pickle":
        with open(hf / evil, "rb") as fh:
            pickle.load(fh)
    else:
        torch.load(hf / evil, weights_only=False)
    assert marker.exists()


# -- c. the Hugging Face cache layout ---------------------------------------------------------------


@pytest.mark.parametrize("by", ["snapshot path", "model id"])
def test_hub_cache_snapshot(
    by: str, untied: transformers.LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = tmp_path / "saved"
    untied.save_pretrained(str(saved), max_shard_size="300KB")
    save_tokenizer(saved)
    # As fetched with `--include "*.safetensors" "*.json"` from a repo that has both formats: the
    # .bin index is there, its shards are not (transformers loads the safetensors).
    weight_map = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    bin_index = {"weight_map": dict.fromkeys(weight_map, "pytorch_model-00001-of-00001.bin")}
    (saved / "pytorch_model.bin.index.json").write_text(json.dumps(bin_index))
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", saved)
    links = sorted(p.name for p in snapshot.iterdir() if p.is_symlink())
    assert len(links) == len(list(saved.iterdir())) and "tokenizer.json" in links
    assert sum(1 for name in links if name.endswith(".safetensors")) == 3
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "onnx"
    convert_and_check(snapshot if by == "snapshot path" else "acme/tiny-llama", out, untied)
    manifest = Manifest.read(out)
    assert manifest.source.kind == "hf" and manifest.source.location == str(snapshot)
    # The artifact holds files, never links into the cache (which may be pruned or moved).
    entries = list(out.rglob("*"))
    assert [p for p in entries if p.is_symlink()] == []
    assert manifest.generation is not None and manifest.generation.tokenizer == "tokenizer"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer("w5 w7 w999").input_ids == [5, 7, VOCAB - 1]


def test_hub_cache_snapshot_with_a_missing_blob_is_one_line(
    untied: transformers.LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted download (or a pruned cache): a shard's link leads to no blob."""
    saved = tmp_path / "saved"
    untied.save_pretrained(str(saved), max_shard_size="300KB")
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", saved)
    (snapshot / "model-00002-of-00003.safetensors").resolve().unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for model in (snapshot, "acme/tiny-llama"):
        out = tmp_path / "onnx"
        result = run_cli("convert", model, "-o", out)
        assert_clean_failure(result, "model-00002-of-00003.safetensors is a link to a missing file", out)
        assert result.exit_code == 2


# -- d. tied embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.LlamaForCausalLM, Path]:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    root = tmp_path_factory.mktemp("tied")
    model.save_pretrained(str(root / "hf"))
    convert_and_check(root / "hf", root / "onnx", model)
    return model, root / "onnx"


def test_tied_embeddings_logits_match(tied: tuple[transformers.LlamaForCausalLM, Path]) -> None:
    model, out = tied
    error = logits_error(out, model)
    assert error <= RTOL, error


def _embedding_copies(out: Path) -> int:
    """Initializers holding the embedding matrix, as is or transposed."""
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = {(VOCAB, HIDDEN), (HIDDEN, VOCAB)}
    return sum(1 for t in proto.graph.initializer if tuple(t.dims) in shapes)


def test_tied_embeddings_are_written_once(
    tied: tuple[transformers.LlamaForCausalLM, Path], sharded_artifact: Path
) -> None:
    _, out = tied
    assert _embedding_copies(sharded_artifact) == 2  # untied: embed_tokens and lm_head
    saved = data_bytes(sharded_artifact) - data_bytes(out)
    assert _embedding_copies(out) == 1, _embedding_copies(out)
    assert saved >= 0.95 * EMBED_BYTES, (saved, EMBED_BYTES)
    # optimize keeps it once too (its constant folding leaves the shared transpose), and numerics hold.
    fused = out.parent / "fused"
    result = run_cli("optimize", out, "-o", fused)
    assert result.exit_code == 0, result.stderr
    assert _embedding_copies(fused) == 1


# -- e. custom code is never run --------------------------------------------------------------------


def test_custom_code_is_never_imported(
    untied: transformers.LlamaForCausalLM, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """config.json's auto_map, tokenizer_config.json's auto_map and a custom_generate/ folder all
    point at Python that would leave a marker file when imported; llm2trt exports the transformers
    class for the model_type and imports none of it."""
    marker = tmp_path / "PWNED"
    hf = tmp_path / "hf"
    untied.save_pretrained(str(hf))
    save_tokenizer(hf)
    evil = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (hf / name).write_text(
            evil + "class EvilConfig: pass\nclass EvilForCausalLM: pass\nclass EvilTokenizer: pass\n"
        )
    (hf / "custom_generate").mkdir()
    (hf / "custom_generate" / "generate.py").write_text(evil + "def generate(model, **kwargs): pass\n")
    config = json.loads((hf / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (hf / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (hf / "tokenizer_config.json").write_text(json.dumps(tok_config))

    out = tmp_path / "onnx"
    result = run_cli("convert", hf, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert "ignoring custom code" in caplog.text  # a warning says so
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text()).get("auto_map") is None
    assert not marker.exists()
    code, compared = run_json("compare", out, "-q")
    assert code == 0 and compared["main_max_rel_err"] <= RTOL
    assert logits_error(out, untied) <= RTOL
    assert not marker.exists()


def test_custom_architecture_is_refused(untied: transformers.LlamaForCausalLM, tmp_path: Path) -> None:
    """A model_type transformers does not know, with auto_map: only its own code could load it."""
    marker = tmp_path / "PWNED"
    hf = tmp_path / "hf"
    untied.save_pretrained(str(hf))
    (hf / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((hf / "config.json").read_text())
    config |= {"model_type": "evil", "architectures": ["EvilForCausalLM"]}
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "onnx"
    result = run_cli("convert", hf, "-o", out)
    assert_clean_failure(result, "unsupported architecture 'evil'", out)
    assert result.exit_code == 2
    assert not marker.exists()


# -- f. a narrow checkpoint converted wide ----------------------------------------------------------


def test_fp16_checkpoint_to_fp32_is_exact_and_drops_the_mapped_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded as stored (fp16, memory-mapped), then widened one tensor at a time with each source's
    pages dropped: the same weights as transformers' own fp32 load, and the pages really go."""
    from llm2trt.convert.sources import resolve_model
    from llm2trt.core import memory
    from llm2trt.core.dtypes import DType

    hf = tmp_path / "hf"
    tiny_llama(seed=5).half().save_pretrained(str(hf))
    dropped: list[int] = []
    real = memory.drop_mapped_pages
    monkeypatch.setattr(memory, "drop_mapped_pages", lambda spans: dropped.append(real(spans)) or dropped[-1])
    ours = resolve_model(str(hf)).load(DType.FP32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], reference[k]) for k in mine)
    assert len(dropped) >= 17 and sum(dropped) >= 100_000  # 2 layers x 9 weights + embeddings, norms
