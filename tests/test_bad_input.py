"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import CC, assert_clean_failure, graph_artifact, run_cli
from tests.corrupt import point_weights_at
from tests.plugin_helpers import importers, install_fake_plugin


def test_missing_model_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("convert", tmp_path / "nope", "-o", out)
    assert_clean_failure(result, "model path does not exist", out)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    result = run_cli("convert", tmp_path / "model", "-o", out)
    assert_clean_failure(result, "config.json is missing", out)


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path: Path) -> None:
    model = tmp_path / "t5"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    (model / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    result = run_cli("convert", model, "-o", out)
    assert_clean_failure(result, "unsupported architecture 't5'", out)
    assert (
        "supported: gpt2, llama (llama, mistral, qwen2), qwen3, gemma3 (gemma3, gemma3_text), phi3, bloom, "
        "mixtral, qwen3_moe, qwen2_moe, bert, vit" in result.stderr
    )


def test_unknown_tiny_spec(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("convert", "tiny:mamba", "-o", out)
    assert_clean_failure(result, "unknown tiny model 'tiny:mamba'", out)
    listed = "tiny:gpt2, tiny:llama, tiny:qwen3, tiny:gemma3, tiny:phi3, tiny:bloom, tiny:mixtral, tiny:qwen3_moe, "
    assert listed + "tiny:qwen2_moe, tiny:bert, tiny:vit" in result.stderr


def test_model_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", bogus, "-o", out), "expected a Hugging Face directory or a .gguf", out)


def test_corrupt_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\x07" * 64)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", bogus, "-o", out), "cannot read GGUF file", out)


@pytest.fixture()
def corrupt_artifact(artifacts: dict[str, Path], tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["tiny:bert"], broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    return broken


@pytest.mark.parametrize("command", ["optimize", "build", "inspect"])
def test_corrupt_onnx(command: str, corrupt_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [command, corrupt_artifact] + ([] if command == "inspect" else ["-o", out])
    if command == "build":
        args += [*CC]
    assert_clean_failure(run_cli(*args), "corrupt ONNX file", out)


def test_not_an_artifact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean_failure(run_cli("optimize", tmp_path, "-o", out), "manifest.json is missing", out)


def test_unwritable_output_directory(artifacts: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    assert_clean_failure(run_cli("convert", "tiny:gpt2", "-o", out), "is not writable", None)
    assert blocker.read_text() == "not a directory"
    # Root ignores permission bits; /proc refuses new directories even to root.
    result = run_cli("optimize", artifacts["tiny:gpt2"], "-o", "/proc/llm2trt-out")
    assert_clean_failure(result, "not writable", None)


def test_existing_output_is_kept_without_force(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli("convert", "tiny:gpt2", "-o", out)
    assert_clean_failure(result, "exists and is not empty; pass --force", None)
    # --force replaces artifacts only: a directory that is not one is never deleted.
    result = run_cli("convert", "tiny:gpt2", "-o", out, "--force")
    assert_clean_failure(result, "not an llm2trt artifact", None)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["convert", "optimize", "build"])
def test_an_existing_output_is_refused_before_anything_loads(
    command: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """The refusal comes first: with torch, transformers, ONNX Runtime and TensorRT unimportable
    it is still the one line about the output, at once, not an import or a load seconds later."""
    import subprocess
    import sys

    out = tmp_path / "taken"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    source = "tiny:llama" if command == "convert" else str(artifacts["tiny:llama"])
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'polygraphy',\n"
        "          'onnx_graphsurgeon'):\n"
        "    sys.modules[m] = None\n"
        "from llm2trt.entry import main\n"
        "sys.argv = ['llm2trt', *sys.argv[1:]]\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, command, source, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"llm2trt: error: output directory {out} exists and is not empty; pass --force to replace it"
    ]


def test_force_replaces_an_artifact(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "opt"
    assert run_cli("optimize", artifacts["tiny:vit"], "-o", out, "-q", "--no-check").exit_code == 0
    first = (out / "manifest.json").stat().st_mtime_ns
    assert run_cli("optimize", artifacts["tiny:vit"], "-o", out, "-q", "--no-check", "--force").exit_code == 0
    assert (out / "manifest.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


def test_output_equal_to_input_is_refused(artifacts: dict[str, Path]) -> None:
    result = run_cli("optimize", artifacts["tiny:vit"], "-o", artifacts["tiny:vit"], "--force")
    assert_clean_failure(result, "is the input", None)
    assert (artifacts["tiny:vit"] / "model.onnx").is_file()


def _one_node(x: str, y: str, shape: list[int], node: onnx.NodeProto) -> onnx.ModelProto:
    """A float graph of one node in a custom domain (the node's), x -> y of one shape."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in (x, y)]
    return helper.make_model(
        helper.make_graph([node], "one", io[:1], io[1:]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(node.domain, 1)],
    )


def test_worker_crash_becomes_a_clear_error(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A controlled crash: a plugin module that segfaults the build worker when it is imported.
    # (TensorRT-RTX 1.7 itself segfaults on some graphs, docs/facts.md; a release may fix those.)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    install_fake_plugin(plugins, monkeypatch, "Crasher", "import signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    out = tmp_path / "engine"
    result = run_cli("build", artifacts["tiny:vit"], "-o", out, *CC)
    assert_clean_failure(result, "the TensorRT worker crashed (SIGSEGV) while it loaded plugins", out)
    assert importers(plugins) and os.getpid() not in importers(plugins)  # only the worker imported it


def test_tensorrt_parse_error_names_the_node(artifacts: dict[str, Path], tmp_path: Path) -> None:
    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="com.example")
    artifact = graph_artifact(artifacts["tiny:vit"], tmp_path / "bad", _one_node("x", "y", [2, 8], node))
    out = tmp_path / "engine"
    result = run_cli("build", artifact, "-o", out, *CC)
    assert_clean_failure(result, "TensorRT could not parse", out)
    assert "mystery" in result.stderr


def test_bad_cli_values(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean_failure(
        run_cli("build", artifacts["tiny:gpt2"], "-o", out, "--compute-capability", "sm90"),
        "unsupported compute capability 'sm90'",
        out,
    )
    assert_clean_failure(
        run_cli("build", artifacts["tiny:gpt2"], "-o", out, *CC, "--profile", "sequence=8:4:16"),
        "invalid dim range 8:4:16",
        out,
    )
    assert_clean_failure(
        run_cli("build", artifacts["tiny:gpt2"], "-o", out, *CC, "--profile", "width=1:2:3"),
        "unknown dims ['width']",
        out,
    )
    assert_clean_failure(run_cli("convert", "tiny:gpt2", "-o", out, "--opset", "23"), "opset 23 is outside", out)
    assert_clean_failure(
        run_cli("compare", artifacts["tiny:gpt2"], "--runners", "torch"), "--runners takes two or more", None
    )


def _relocate(artifact: Path, out: Path, how: str) -> Path:
    """A copy of `artifact` whose weights point outside it (or are cut short)."""
    shutil.copytree(artifact, out)
    data = out / "model.onnx.data"
    outside = out.parent / f"outside-{how}.data"
    shutil.copy(data, outside)
    if how == "truncated":
        with open(data, "r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
        return out
    if how == "symlink":
        data.unlink()
        data.symlink_to(outside)
        return out
    return point_weights_at(out, f"../{outside.name}" if how == "parent" else str(outside))


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "truncated"])
@pytest.mark.parametrize("command", ["optimize", "build", "compare", "inspect", "generate"])
def test_external_data_outside_the_artifact_is_refused(
    how: str, command: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    bad = _relocate(artifacts["tiny:llama"], tmp_path / "bad", how)
    out = tmp_path / "out"
    args: list[str | Path] = {
        "optimize": ["optimize", bad, "-o", out],
        "build": ["build", bad, "-o", out, *CC],
        "compare": ["compare", bad, "--runners", "torch,ort"],
        "inspect": ["inspect", bad],
        "generate": ["generate", bad, "--ids", "1,2,3", "--max-new-tokens", "2"],
    }[command]
    fragment = "the file is truncated" if how == "truncated" else "refusing to read it"
    assert_clean_failure(run_cli(*args), fragment, out)


def _small_disk() -> None:
    """The child may write files of 300 KB at most (RLIMIT_FSIZE): a full disk, for one process."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


@pytest.mark.parametrize("command", ["convert", "optimize", "optimize --tp 2", "build"])
def test_a_full_disk_leaves_one_line_and_nothing_written(
    command: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    verb, *options = command.split()
    source = "tiny:llama" if verb == "convert" else str(artifacts["tiny:llama"])
    out = tmp_path / "out" / "artifact"
    out.parent.mkdir()
    args = [str(Path(sys.executable).parent / "llm2trt"), verb, source, *options, "-o", str(out)]
    args += [*CC] if verb == "build" else []
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=_small_disk, timeout=300, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llm2trt: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in errors[0] and "internal error" not in errors[0], errors[0]
    assert list(out.parent.iterdir()) == []  # no artifact, no staging directory
