"""The layering holds: the foundation (llm2trt.core) imports nothing else of ours; exporters and
passes import only the foundation (and themselves); plugins also the passes (a plugin's rewrite
rule is written in their pattern language); stages and the CLI sit on top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source directory -> the package it installs as, and which llm2trt packages it may import.
LAYERS = {
    "llm2trt/core": ("llm2trt.core", ("llm2trt.core",)),
    "exporters": ("llm2trt.exporters", ("llm2trt.core", "llm2trt.exporters")),
    "passes": ("llm2trt.passes", ("llm2trt.core", "llm2trt.passes")),
    "plugins": ("llm2trt.plugins", ("llm2trt.core", "llm2trt.passes", "llm2trt.plugins")),
}


def imported(source: str) -> list[str]:
    """Every llm2trt module a source imports, lazy imports inside functions included."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "llm2trt" or n.startswith("llm2trt.")]


def violations(directory: Path, allowed: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(directory.rglob("*.py")):
        for name in imported(path.read_text()):
            # `from llm2trt import __version__`, and `from llm2trt.core import errors`, are fine.
            if name in ("llm2trt", "llm2trt.__version__") or any(
                name == a or name.startswith(a + ".") for a in allowed
            ):
                continue
            found.append(f"{path.relative_to(directory)} imports {name}")
    return found


@pytest.mark.parametrize("directory", list(LAYERS))
def test_layer_imports_only_what_is_below_it(directory: str) -> None:
    _package, allowed = LAYERS[directory]
    assert violations(ROOT / directory, allowed) == []


def test_the_check_catches_a_foundation_importing_a_stage(tmp_path: Path) -> None:
    (tmp_path / "records.py").write_text("def f():\n    from llm2trt.export import convert\n")
    (tmp_path / "ok.py").write_text("from llm2trt.core.errors import InputError\nfrom llm2trt import __version__\n")
    assert [v.split(" imports ")[1] for v in violations(tmp_path, ("llm2trt.core",))] == [
        "llm2trt.export",
        "llm2trt.export.convert",
    ]


def test_importing_a_layer_loads_nothing_above_it() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import llm2trt.core\n"
        "for m in pkgutil.iter_modules(llm2trt.core.__path__):\n"
        "    importlib.import_module('llm2trt.core.' + m.name)\n"
        "core = sorted(m for m in sys.modules if m.startswith('llm2trt.') and not m.startswith('llm2trt.core'))\n"
        "import llm2trt.exporters, llm2trt.passes.pipeline, llm2trt.plugins\n"
        "middle = sorted(m for m in sys.modules if m.startswith('llm2trt.') and m.split('.')[1] not in\n"
        "                ('core', 'exporters', 'passes', 'plugins'))\n"
        "print(core, middle)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"
