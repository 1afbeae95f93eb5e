"""Bad-input corpus: every command, fed what users get wrong, fails the same way.

Each case runs the real console script in a fresh sandbox: the working directory is an empty
directory, and HOME, TMPDIR and XDG_CACHE_HOME (so the Hugging Face, torch and ONNX Runtime
caches) point inside it. A case passes when the command exits with the expected code (2: bad
input), prints exactly one `llm2trt: error:` line naming the cause as the last line of stderr
(before it at most llm2trt's own `[llm2trt]` progress lines: no traceback, no click usage block,
no third-party noise), prints nothing on stdout (with --json: the one `{"ok": false, "error": ...}`
object), and changes nothing on disk: the case's whole directory (sandbox, inputs, the named
output) and the session's shared artifacts have the same paths, sizes, mtimes and contents
afterwards, so no output, staging directory, cache entry or scratch file was left anywhere a
case can see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llm2trt.cli.main import cli
from tests.conftest import BACKEND, CC, run_cli
from tests.corrupt import point_weights_at

CLI = Path(sys.executable).parent / "llm2trt"
# Variables that would send caches somewhere other than HOME / XDG_CACHE_HOME / TMPDIR.
REDIRECTED = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_MODULES_CACHE",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TMP",
    "TEMP",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
)


@dataclass(frozen=True)
class Workspace:
    """One case's directory: `sandbox` (the cwd, holding HOME, TMPDIR and XDG_CACHE_HOME), `inputs`
    (what the case prepares) and `out` (the output it names; absent unless the case makes it)."""

    root: Path
    shared: dict[str, Path]  # the session's artifacts (tiny:*) and a cache-less decoder ("nokv")

    @property
    def sandbox(self) -> Path:
        return self.root / "sandbox"

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def art(self, name: str) -> Path:
        """A shared artifact, used read-only (the snapshot covers it)."""
        return self.shared[name]

    def copy(self, name: str, dest: Path | None = None) -> Path:
        """A private copy of a shared artifact (to break), in inputs/art unless `dest` is given."""
        dest = dest or self.inputs / "art"
        shutil.copytree(self.shared[name], dest, symlinks=True)
        return dest

    def write(self, relative: str, content: bytes | str) -> Path:
        path = self.inputs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return path


Args = Sequence[str | Path]


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Workspace], Args]  # prepares the inputs; returns the arguments after `llm2trt`
    fragment: str  # in the error line
    code: int = 2
    json: bool = False  # add --json: stdout must be the one failure object
    xfail: str | None = None  # a library bug that is not ours to fix here (see the reason)

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


# -- input makers ----------------------------------------------------------------------------------


def edit_manifest(path: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    data = json.loads((path / "manifest.json").read_text())
    result = change(data)
    (path / "manifest.json").write_text(json.dumps(data if result is None else result))
    return path


def flip(artifact: Path, name: str) -> Path:
    """Flip one byte in the middle of the artifact's file `name`: sizes and offsets still agree."""
    path = artifact / name
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x40]))
    return artifact


def cut(artifact: Path, name: str) -> Path:
    """Truncate the artifact's file `name` to half its size."""
    path = artifact / name
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    return artifact


def garbled(ws: Workspace, content: bytes = b'{"architecture": "llama",') -> Path:
    """A copy of the tiny Llama whose manifest.json holds `content` (cut-off JSON by default)."""
    art = ws.copy("tiny:llama")
    (art / "manifest.json").write_bytes(content)
    return art


def relocate_weights(artifact: Path, how: str) -> Path:
    """Point the artifact's external data outside it: `../`, an absolute path, or a symlink."""
    data = artifact / "model.onnx.data"
    outside = artifact.parent / "outside.data"
    shutil.copy(data, outside)
    if how == "symlink":
        data.unlink()
        data.symlink_to(outside)
        return artifact
    return point_weights_at(artifact, "../outside.data" if how == "parent" else str(outside))


def hf_dir(ws: Workspace, config: bytes | str | None, weights: bytes | None = b"x") -> Path:
    """A Hugging Face-style directory with this config.json and model.safetensors (None: left out)."""
    path = ws.inputs / "hf"
    path.mkdir(parents=True)
    if config is not None:
        ws.write("hf/config.json", config)
    if weights is not None:
        ws.write("hf/model.safetensors", weights)
    return path


def tiny_llama_config(ws: Workspace) -> str:
    """The tiny Llama's transformers config, as a real checkpoint directory would hold it."""
    manifest = json.loads((ws.art("tiny:llama") / "manifest.json").read_text())
    return json.dumps(manifest["model_config"])


def old_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest as llm2trt wrote it before artifacts held several graphs."""
    graph = next(iter(data.pop("graphs").values()))
    return {**data, "llm2trt_version": "0.0.1", "inputs": graph["inputs"], "outputs": graph["outputs"]}


def no_graphs(data: dict[str, Any]) -> None:
    data["graphs"] = {}


def no_architecture(data: dict[str, Any]) -> None:
    del data["architecture"]


def a_file(path: Path) -> Path:
    path.write_text("a file, not a directory")
    return path


def occupied(ws: Workspace) -> Path:
    """The named output exists, is not an artifact and holds a file."""
    ws.out.mkdir()
    (ws.out / "notes.txt").write_text("keep me")
    return ws.out


def golden_garbage(ws: Workspace) -> Path:
    return ws.write("golden.npz", b"PK\x03\x04 not really a zip")


CC_FRAGMENT = (
    "unsupported compute capability 'sm1'" if BACKEND.is_rtx else "--compute-capability is a TensorRT-RTX option"
)
REFIT_FRAGMENT = (
    "is not an engine directory made by `llm2trt build`"
    if BACKEND.supports("refit")
    else "refitting engines need full TensorRT"
)
LONG_PROMPT = ",".join(["5"] * 300)  # the tiny decoders' sequence profile ends at 256

# -- the corpus ------------------------------------------------------------------------------------

CASES: list[Case] = [
    # convert: model sources
    Case(
        "convert/missing-model",
        lambda ws: ["convert", ws.inputs / "nope", "-o", ws.out],
        "model path does not exist",
        json=True,
    ),
    Case(
        "convert/plain-file",
        lambda ws: ["convert", ws.write("weights.bin", b"\0" * 64), "-o", ws.out],
        "expected a Hugging Face directory or a .gguf file",
    ),
    Case(
        "convert/gguf-without-magic",
        lambda ws: ["convert", ws.write("model.gguf", "hello, not a gguf"), "-o", ws.out],
        "does not start with the GGUF magic bytes",
    ),
    Case(
        "convert/config-not-json",
        lambda ws: ["convert", hf_dir(ws, '{"model_type": "llama",'), "-o", ws.out],
        "hf/config.json: Expecting",
    ),
    Case(
        "convert/config-not-utf8",
        lambda ws: ["convert", hf_dir(ws, b"\xff\xfe{garbage"), "-o", ws.out],
        "config.json",
    ),
    Case(
        "convert/config-wrong-field-type",
        lambda ws: ["convert", hf_dir(ws, '{"model_type": "llama", "hidden_size": "big"}'), "-o", ws.out],
        "hidden_size",
    ),
    Case(
        "convert/config-without-model-type",
        lambda ws: ["convert", hf_dir(ws, '{"hidden_size": 8}'), "-o", ws.out],
        "has no model_type; cannot tell the architecture",
    ),
    Case(
        "convert/unknown-architecture",
        lambda ws: ["convert", hf_dir(ws, '{"model_type": "t5", "d_model": 8}'), "-o", ws.out],
        "unsupported architecture 't5'",
    ),
    Case(
        "convert/no-weights",
        lambda ws: ["convert", hf_dir(ws, tiny_llama_config(ws), weights=None), "-o", ws.out],
        "no weights in",
    ),
    Case(
        "convert/garbage-safetensors",
        lambda ws: ["convert", hf_dir(ws, tiny_llama_config(ws), weights=b"\x10garbage"), "-o", ws.out],
        "cannot load weights",
    ),
    Case(
        "convert/model-id-not-in-cache",
        lambda ws: ["convert", "someorg/no-such-model", "-o", ws.out],
        "is neither a path nor in the local Hugging Face cache",
    ),
    Case(
        "convert/unknown-tiny-spec",
        lambda ws: ["convert", "tiny:mamba", "-o", ws.out],
        "unknown tiny model 'tiny:mamba'",
    ),
    # convert: options and the output directory
    Case(
        "convert/bad-dtype",
        lambda ws: ["convert", "tiny:llama", "-o", ws.out, "--dtype", "fp64"],
        "Invalid value for '--dtype': 'fp64' is not one of 'fp32', 'fp16', 'bf16'",
        json=True,
    ),
    Case(
        "convert/missing-output-option",
        lambda ws: ["convert", "tiny:llama"],
        "Missing option '-o' / '--output'",
    ),
    Case(
        "convert/output-is-a-file",
        lambda ws: ["convert", "tiny:llama", "-o", a_file(ws.out)],
        "exists and is a file",
    ),
    Case(
        "convert/output-not-empty",
        lambda ws: ["convert", "tiny:llama", "-o", occupied(ws)],
        "exists and is not empty; pass --force to replace it",
    ),
    Case(
        "convert/force-over-non-artifact",
        lambda ws: ["convert", "tiny:llama", "-o", occupied(ws), "--force"],
        "it is not an llm2trt artifact",
    ),
    Case(
        "convert/output-under-a-file",
        lambda ws: ["convert", "tiny:llama", "-o", ws.write("blocker", "x") / "out"],
        "is not writable",
    ),
    # optimize: the input artifact
    Case(
        "optimize/missing-artifact",
        lambda ws: ["optimize", ws.inputs / "nope", "-o", ws.out],
        "artifact directory does not exist",
        json=True,
    ),
    Case(
        "optimize/file-for-artifact",
        lambda ws: ["optimize", ws.write("model.onnx", b"\0"), "-o", ws.out],
        "is a file",
    ),
    Case(
        "optimize/directory-without-manifest",
        lambda ws: ["optimize", ws.write("empty/readme.txt", "x").parent, "-o", ws.out],
        "manifest.json is missing",
    ),
    Case(
        "optimize/manifest-not-json",
        lambda ws: ["optimize", garbled(ws), "-o", ws.out],
        "art/manifest.json: Expecting",
    ),
    Case(
        "optimize/manifest-not-an-object",
        lambda ws: ["optimize", edit_manifest(ws.copy("tiny:llama"), lambda d: [d["architecture"]]), "-o", ws.out],
        "is malformed (not a JSON object but list)",
    ),
    Case(
        "optimize/manifest-of-an-old-version",
        lambda ws: ["optimize", edit_manifest(ws.copy("tiny:llama"), old_manifest), "-o", ws.out],
        "was written by llm2trt 0.0.1, before artifacts held several graphs",
    ),
    Case(
        "generate/truncated-onnx",
        lambda ws: ["generate", cut(ws.copy("tiny:llama"), "model.onnx"), "--ids", "1"],
        "corrupt ONNX file",
    ),
    Case(
        "optimize/bad-input-keeps-existing-artifact",
        lambda ws: [
            "optimize",
            cut(ws.copy("tiny:llama"), "model.onnx"),
            "-o",
            ws.copy("tiny:gpt2", ws.out),
            "--force",
        ],
        "corrupt ONNX file",
    ),
    Case(
        "optimize/existing-artifact-without-force",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.copy("tiny:gpt2", ws.out)],
        "exists and is not empty; pass --force to replace it",
    ),
    # optimize: where the output goes, and the options
    Case(
        "optimize/output-is-input",
        lambda ws: ["optimize", ws.copy("tiny:llama"), "-o", ws.inputs / "art", "--force"],
        "is the input; write to another directory",
    ),
    Case(
        "optimize/output-inside-input",
        lambda ws: ["optimize", ws.copy("tiny:llama"), "-o", ws.inputs / "art" / "opt"],
        "is inside the input",
    ),
    Case(
        "optimize/output-contains-input",
        lambda ws: ["optimize", ws.copy("tiny:llama"), "-o", ws.inputs, "--force"],
        "replacing it would delete the input",
    ),
    Case(
        "optimize/bad-quant",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.out, "--quant", "int3"],
        "Invalid value for '--quant': 'int3' is not one of",
    ),
    Case(
        "optimize/calib-without-quant",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.out, "--calib", ws.write("calib.txt", "text")],
        "--calib, --keep and --keep-sensitive go with --quant",
    ),
    Case(
        "optimize/tp-not-dividing-heads",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.out, "--tp", "3"],
        "--tp 3: 4 attention heads do not divide into 3 ranks",
    ),
    Case(
        "optimize/bad-group-size",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.out, "--quant", "int4-rtn", "--group-size", "7"],
        "--group-size must be a power of two",
    ),
    Case(
        "optimize/unknown-plugin",
        lambda ws: ["optimize", ws.art("tiny:llama"), "-o", ws.out, "--plugin", "Nope"],
        "unknown plugin 'Nope'",
    ),
    # build
    Case(
        "build/missing-artifact",
        lambda ws: ["build", ws.inputs / "nope", "-o", ws.out, *CC],
        "artifact directory does not exist",
    ),
    Case(
        "build/manifest-missing-field",
        lambda ws: ["build", edit_manifest(ws.copy("tiny:llama"), no_architecture), "-o", ws.out, *CC],
        "is malformed (Manifest: missing 'architecture')",
    ),
    Case(
        "build/bad-compute-capability",
        lambda ws: ["build", ws.art("tiny:llama"), "-o", ws.out, "--compute-capability", "sm1"],
        CC_FRAGMENT,
    ),
    Case(
        "build/bad-opt-level",
        lambda ws: ["build", ws.art("tiny:llama"), "-o", ws.out, *CC, "--opt-level", "9"],
        "--opt-level 9: TensorRT's builder optimization levels are 0 to 5",
    ),
    Case(
        "build/bad-profile",
        lambda ws: ["build", ws.art("tiny:llama"), "-o", ws.out, *CC, "--profile", "sequence=1:x:8"],
        "bad --profile 'sequence=1:x:8'",
    ),
    Case(
        "build/profiles-file-not-json",
        lambda ws: ["build", ws.art("tiny:llama"), "-o", ws.out, *CC, "--profiles", ws.write("p.json", "{")],
        "cannot read it as JSON",
    ),
    Case(
        "build/truncated-external-data",
        lambda ws: ["build", cut(ws.copy("tiny:llama"), "model.onnx.data"), "-o", ws.out, *CC],
        "the file is truncated",
        json=True,
    ),
    Case(
        "build/flipped-byte-in-weights",
        lambda ws: ["build", flip(ws.copy("tiny:llama"), "model.onnx.data"), "-o", ws.out, *CC],
        "is corrupt: its sha256 is not the one recorded",
    ),
    Case(
        "inspect/verify-flipped-byte",
        lambda ws: ["inspect", flip(ws.copy("tiny:gpt2"), "model.onnx.data"), "--verify"],
        "is corrupt: its sha256 is not the one recorded",
        json=True,
    ),
    Case(
        "build/bad-backend",
        lambda ws: ["build", ws.art("tiny:llama"), "-o", ws.out, "--backend", "cuda"],
        "Invalid value for '--backend'",
    ),
    # compare
    Case(
        "compare/missing-artifact",
        lambda ws: ["compare", ws.inputs / "nope"],
        "artifact directory does not exist",
    ),
    Case(
        "compare/one-runner",
        lambda ws: ["compare", ws.art("tiny:llama"), "--runners", "torch"],
        "--runners takes two or more distinct names from torch, ort, trt (got torch)",
    ),
    Case(
        "compare/bad-mark-regex",
        lambda ws: ["compare", ws.art("tiny:llama"), "--mark", "("],
        "--mark takes none, all or a regular expression; '(' is not one",
    ),
    Case(
        "compare/missing-golden",
        lambda ws: ["compare", ws.art("tiny:llama"), "--check-golden", ws.inputs / "nope.npz"],
        "no golden file at",
    ),
    Case(
        "compare/garbage-golden",
        lambda ws: ["compare", ws.art("tiny:llama"), "--check-golden", golden_garbage(ws)],
        "is not an llm2trt golden file",
    ),
    Case(
        "compare/negative-atol",
        lambda ws: ["compare", ws.art("tiny:llama"), "--atol", "-1"],
        "Invalid value for '--atol': -1.0 is not in the range x>=0",
    ),
    Case(
        "compare/manifest-unknown-dtype",
        lambda ws: ["compare", edit_manifest(ws.copy("tiny:llama"), lambda d: d.update(dtype="fp64"))],
        "unknown dtype 'fp64'",
    ),
    Case(
        "compare/external-data-absolute",
        lambda ws: ["compare", relocate_weights(ws.copy("tiny:llama"), "absolute")],
        "outside the artifact",
    ),
    # inspect
    Case(
        "inspect/missing-artifact",
        lambda ws: ["inspect", ws.inputs / "nope"],
        "artifact directory does not exist",
        json=True,
    ),
    Case(
        "inspect/garbage-onnx-file",
        lambda ws: ["inspect", ws.write("model.onnx", b"\x08\x07not a protobuf\xff\xff")],
        "corrupt ONNX file",
    ),
    Case(
        "inspect/manifest-not-utf8",
        lambda ws: ["inspect", garbled(ws, b"\xff\xfe{")],
        "cannot read",
    ),
    Case(
        "inspect/external-data-symlink-out",
        lambda ws: ["inspect", relocate_weights(ws.copy("tiny:llama"), "symlink")],
        "a link leading outside the artifact",
    ),
    # serve
    Case(
        "serve/encoder-artifact",
        lambda ws: ["serve", ws.art("tiny:bert"), "--port", "0"],
        "serve needs a decoder artifact; this one is bert (feature-extraction)",
        json=True,
    ),
    Case(
        "serve/no-kv-cache",
        lambda ws: ["serve", ws.art("nokv"), "--port", "0"],
        "this artifact has no KV cache",
    ),
    Case(
        "serve/api-key-variable-unset",
        lambda ws: ["serve", ws.art("tiny:llama"), "--api-key-env", "LLM2TRT_NO_SUCH_KEY"],
        "--api-key-env: the environment variable LLM2TRT_NO_SUCH_KEY is not set or empty",
    ),
    Case(
        "serve/address-not-here",
        lambda ws: ["serve", ws.art("tiny:llama"), "--host", "203.0.113.7", "--port", "0"],
        "cannot listen on 203.0.113.7:0: Cannot assign requested address",
    ),
    Case(
        "serve/port-out-of-range",
        lambda ws: ["serve", ws.art("tiny:llama"), "--port", "70000"],
        "Invalid value for '--port'",
    ),
    # generate
    Case(
        "generate/encoder-artifact",
        lambda ws: ["generate", ws.art("tiny:bert"), "--ids", "1,2,3"],
        "generate needs a decoder artifact; this one is bert (feature-extraction)",
        json=True,
    ),
    Case(
        "generate/image-artifact",
        lambda ws: ["generate", ws.art("tiny:vit"), "--ids", "1,2,3"],
        "generate needs a decoder artifact; this one is vit (image-classification)",
    ),
    Case(
        "generate/no-kv-cache",
        lambda ws: ["generate", ws.art("nokv"), "--ids", "1,2,3"],
        "this artifact has no KV cache",
    ),
    Case(
        "generate/prompt-longer-than-profile",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", LONG_PROMPT],
        "a prompt of 300 tokens is longer than this artifact allows (256)",
    ),
    Case(
        "generate/prompt-plus-new-tokens-too-long",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1,2", "--max-new-tokens", "300"],
        "needs 302 positions; this artifact holds 256",
    ),
    Case(
        "generate/bad-ids",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1,2,x"],
        "--ids takes comma-separated token ids",
    ),
    Case(
        "generate/ids-outside-vocabulary",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1,99999,-5"],
        "token ids outside this model's vocabulary of 1000 (0 to 999): -5, 99999",
    ),
    Case(
        "generate/empty-prompt",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", ","],
        "every prompt needs at least one token",
    ),
    Case(
        "generate/text-without-tokenizer",
        lambda ws: ["generate", ws.art("tiny:llama"), "--prompt", "hello"],
        "this artifact has no tokenizer",
    ),
    Case(
        "generate/unknown-runner",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1", "--runner", "vllm"],
        "unknown generate runner 'vllm'",
    ),
    Case(
        "generate/trt-without-engine",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1", "--runner", "trt"],
        "no engine in",
    ),
    Case(
        "generate/negative-temperature",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1", "--temperature", "-1"],
        "sampling needs --temperature >= 0",
    ),
    Case(
        "generate/zero-new-tokens",
        lambda ws: ["generate", ws.art("tiny:llama"), "--ids", "1", "--max-new-tokens", "0"],
        "Invalid value for '--max-new-tokens': 0 is not in the range x>=1",
    ),
    Case(
        "generate/manifest-without-graphs",
        lambda ws: ["generate", edit_manifest(ws.copy("tiny:llama"), no_graphs), "--ids", "1"],
        "manifest lists no graphs",
    ),
    Case(
        "generate/external-data-parent",
        lambda ws: ["generate", relocate_weights(ws.copy("tiny:llama"), "parent"), "--ids", "1"],
        "'../outside.data', outside the artifact",
    ),
    # debug
    Case(
        "debug/missing-artifact",
        lambda ws: ["debug", "bisect", ws.inputs / "nope"],
        "artifact directory does not exist",
    ),
    Case(
        "debug/one-runner",
        lambda ws: ["debug", "bisect", ws.art("tiny:llama"), "--runners", "ort"],
        "--runners takes two or more",
    ),
    Case(
        "debug/unknown-subcommand",
        lambda ws: ["debug", "trace", ws.art("tiny:llama")],
        "No such command 'trace'",
    ),
    # eval
    Case(
        "eval/missing-text",
        lambda ws: ["eval", "ppl", ws.art("tiny:llama"), "--text", ws.inputs / "nope.txt"],
        "no text file at",
        json=True,
    ),
    Case(
        "eval/text-not-utf8",
        lambda ws: ["eval", "ppl", ws.art("tiny:llama"), "--text", ws.write("t.txt", b"\xff\xfe\xfa")],
        "as UTF-8 text",
    ),
    Case(
        "eval/encoder-artifact",
        lambda ws: ["eval", "ppl", ws.art("tiny:bert"), "--text", ws.write("t.txt", "some text")],
        "eval ppl needs a decoder artifact",
    ),
    Case(
        "eval/no-tokenizer",
        lambda ws: ["eval", "ppl", ws.art("tiny:llama"), "--text", ws.write("t.txt", "some text")],
        "has no tokenizer (tiny models have none)",
    ),
    Case(
        "eval/window-too-small",
        lambda ws: ["eval", "ppl", ws.art("tiny:llama"), "--text", ws.write("t.txt", "x"), "--window", "1"],
        "Invalid value for '--window': 1 is not in the range x>=2",
    ),
    # the rest
    Case(
        "refit/missing-engine-directory",
        lambda ws: ["refit", ws.inputs / "nope", "--weights", ws.art("tiny:llama")],
        REFIT_FRAGMENT,
    ),
    Case(
        "plugins/unknown-option",
        lambda ws: ["plugins", "--bogus"],
        "No such option '--bogus'",
    ),
    Case(
        "llm2trt/unknown-command",
        lambda ws: ["frobnicate", ws.art("tiny:llama")],
        "No such command 'frobnicate'",
        json=True,
    ),
]


# -- running a case --------------------------------------------------------------------------------

Entry = tuple[Any, ...]


# torch makes its (empty) compile-cache directory in TMPDIR when it is imported: not llm2trt's.
TORCH_AT_IMPORT = "torchinductor_"


def snapshot(*roots: Path) -> dict[str, Entry]:
    """Every path under `roots`: directories, links (their targets) and files (size, mtime, sha256)."""
    seen: dict[str, Entry] = {}
    for root in roots:
        for top, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(top, name)
                if path.parent.name == "tmp" and name.startswith(TORCH_AT_IMPORT) and not any(path.iterdir()):
                    continue
                if path.is_symlink():
                    seen[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    seen[str(path)] = ("dir",)
                else:
                    stat = path.stat()
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    seen[str(path)] = ("file", stat.st_size, stat.st_mtime_ns, digest)
    return seen


def changes(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    added = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    removed = [f"- {p}" for p in sorted(before.keys() - after.keys())]
    changed = [f"~ {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return added + removed + changed


def sandbox_env(ws: Workspace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in REDIRECTED}
    env.update(
        HOME=str(ws.sandbox / "home"),
        TMPDIR=str(ws.sandbox / "tmp"),
        XDG_CACHE_HOME=str(ws.sandbox / "cache"),
        COLUMNS="200",
    )
    return env


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    changed: list[str]  # paths added, removed or altered anywhere the case can see
    had_out: bool  # the case made its named output before the command ran


def run_case(case: Case, ws: Workspace) -> Outcome:
    for folder in ("home", "tmp", "cache"):
        (ws.sandbox / folder).mkdir(parents=True)
    ws.inputs.mkdir()
    args = [str(a) for a in case.make(ws)] + (["--json"] if case.json else [])
    had_out = ws.out.exists()
    roots = [ws.root, *ws.shared.values()]
    before = snapshot(*roots)
    proc = subprocess.run(
        [str(CLI), *args],
        cwd=ws.sandbox,
        env=sandbox_env(ws),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr, changes(before, snapshot(*roots)), had_out)


@pytest.fixture(scope="module")
def shared(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny artifacts and a cache-less tiny decoder (for generate)."""
    nokv = tmp_path_factory.mktemp("corpus") / "gpt2-nokv"
    result = run_cli("convert", "tiny:gpt2", "-o", nokv, "--no-kv-cache", "-q")
    assert result.exit_code == 0, result.stderr
    return {**artifacts, "nokv": nokv}


def test_the_corpus_is_big_and_covers_every_command() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    commands = set(cli.commands)
    assert {"convert", "optimize", "build", "compare", "inspect", "generate", "debug", "eval"} <= commands
    assert commands <= {c.id.split("/")[0] for c in CASES}
    listed = run_cli("--help").stdout.split("Commands:")[1]
    assert {line.split()[0] for line in listed.strip().splitlines()} == commands


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, shared: dict[str, Path], tmp_path: Path) -> None:
    ws = Workspace(tmp_path, shared)
    outcome = run_case(case, ws)
    stderr = outcome.stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("llm2trt: error:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    assert "internal error" not in errors[0], errors[0]
    assert case.fragment in errors[0], errors[0]
    assert [line for line in lines[:-1] if not line.startswith("[llm2trt] ")] == [], stderr
    assert outcome.code == case.code, stderr
    if case.json:
        assert outcome.stdout.count("\n") == 1, outcome.stdout
        assert json.loads(outcome.stdout) == {"ok": False, "error": errors[0].removeprefix("llm2trt: error: ")}
    else:
        assert outcome.stdout == ""
    assert outcome.changed == [], "\n".join(outcome.changed)
    assert ws.out.exists() == outcome.had_out  # no output made; one that was there is untouched (above)
