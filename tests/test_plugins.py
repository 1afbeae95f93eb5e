"""The plugin registry reaches the build worker: a registered plugin is imported there and, under
TensorRT-RTX, reported as inlined (registering it would abort the process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm2trt.plugins import PLUGINS, PluginRef, refs
from tests.conftest import CC, run_json
from tests.plugin_helpers import importers, install_fake_plugin


def test_a_dummy_plugin_reaches_the_worker(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "plugins"
    root.mkdir()
    module = install_fake_plugin(root, monkeypatch, "DummyOp")
    # Announced, not imported: the CLI process never runs plugin code.
    assert PluginRef("DummyOp", module) in refs() and "DummyOp" not in PLUGINS
    code, info = run_json("build", artifacts["tiny:llama"], "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    [status] = [p for p in info["plugins"] if p["name"] == "DummyOp"]
    # Imported in the worker, not registered: this graph has no DummyOp node.
    assert (status["name"], status["domain"], status["version"]) == ("DummyOp", "llm2trt", 1)
    assert (status["status"], status["nodes"]) == ("unused", 0)
    # The module ran in the worker, and only there.
    pids = importers(root)
    assert len(pids) == 1 and pids[0] != os.getpid()


def test_only_the_builtin_plugins_by_default(artifacts: dict[str, Path], tmp_path: Path) -> None:
    code, info = run_json("build", artifacts["tiny:bert"], "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0 and [(p["name"], p["nodes"]) for p in info["plugins"]] == [("Int4GroupGemm", 0), ("MoE", 0)]
    assert refs() == [
        PluginRef("Int4GroupGemm", "llm2trt.plugins.int4_gemm"),
        PluginRef("MoE", "llm2trt.plugins.moe_trt"),
    ]
