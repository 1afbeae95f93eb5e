"""Fake plugins for tests: a module plus a distribution that announces it through the
`llm2trt.plugins` entry point, so every process (the CLI, the build worker) finds it the way it
finds a real third-party plugin."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest


def install_fake_plugin(root: Path, monkeypatch: pytest.MonkeyPatch, name: str, behaviour: str = "") -> str:
    """Write module `llm2trt_fake_<name>` registering op `name`; `behaviour` runs when it is
    imported (only the build worker imports it). Returns the module name."""
    module = f"llm2trt_fake_{name.lower()}"
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import os
            from pathlib import Path

            from llm2trt.plugins import PluginSpec, register_plugin

            Path({str(root)!r}, "imported-" + str(os.getpid())).write_text("{name}")
            register_plugin(PluginSpec({name!r}, 1, __name__, lambda trt: None))
            """
        )
        + textwrap.dedent(behaviour)
    )
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[llm2trt.plugins]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return module


def importers(root: Path) -> list[int]:
    """The process ids that imported a fake plugin module in `root`."""
    return [int(p.name.split("-")[1]) for p in root.glob("imported-*")]
