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

# Source directory -> the package it installs as, and which llm2trt packages it may import. Below the
# stages: the foundation, exporters and passes, plugins, convert (sources and the exporter's module
# wrapper, which the torch backend runs), the backends. A stage imports what is below it, never another
# stage; the CLI and the console script sit on top.
_BELOW_STAGES = (
    "llm2trt.core",
    "llm2trt.exporters",
    "llm2trt.passes",
    "llm2trt.plugins",
    "llm2trt.convert",
    "llm2trt.backends",
)
LAYERS = {
    "llm2trt/core": ("llm2trt.core", ("llm2trt.core",)),
    "exporters": ("llm2trt.exporters", ("llm2trt.core", "llm2trt.exporters")),
    "passes": ("llm2trt.passes", ("llm2trt.core", "llm2trt.passes")),
    "plugins": ("llm2trt.plugins", ("llm2trt.core", "llm2trt.passes", "llm2trt.plugins")),
    # convert runs passes on what it exports (the fp16 residual, the MoE op's body).
    "llm2trt/convert": ("llm2trt.convert", ("llm2trt.core", "llm2trt.exporters", "llm2trt.passes", "llm2trt.convert")),
    "llm2trt/backends": ("llm2trt.backends", _BELOW_STAGES),
    **{
        f"llm2trt/{stage}": (f"llm2trt.{stage}", (*_BELOW_STAGES, f"llm2trt.{stage}"))
        for stage in ("optimize", "build", "compare", "generate", "serve", "inspect")
    },
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
    (tmp_path / "records.py").write_text("def f():\n    from llm2trt.convert.export import convert\n")
    (tmp_path / "ok.py").write_text("from llm2trt.core.errors import InputError\nfrom llm2trt import __version__\n")
    assert [v.split(" imports ")[1] for v in violations(tmp_path, ("llm2trt.core",))] == [
        "llm2trt.convert.export",
        "llm2trt.convert.export.convert",
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


# Source directory -> the package it installs as, for the module graph below.
SOURCES = {
    "llm2trt": "llm2trt",
    "exporters": "llm2trt.exporters",
    "passes": "llm2trt.passes",
    "plugins": "llm2trt.plugins",
}


def module_sources(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the installed package by its dotted name (a package by its __init__)."""
    found = {}
    for directory, package in SOURCES.items():
        for path in sorted((root / directory).rglob("*.py")):
            parts = list(path.relative_to(root / directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _owner(target: str, modules: dict[str, Path]) -> str:
    """The module of ours a dotted import name lands in ('' for none)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (at the top or inside a function); `from pkg import mod`
    counts as importing the submodule, `from pkg import name` as importing the package."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        graph[name] = {t for t in (_owner(n, modules) for n in imported(path.read_text())) if t and t != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or through others."""
    reach = {node: _reachable(graph, node) for node in graph}
    groups = {tuple(sorted({node} | {m for m in reach[node] if node in reach[m]})) for node in graph}
    return sorted(list(group) for group in groups if len(group) > 1)


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph(module_sources())) == []


def test_the_cycle_check_catches_a_planted_cycle(tmp_path: Path) -> None:
    for directory in SOURCES:
        (tmp_path / directory).mkdir()
    (tmp_path / "llm2trt" / "a.py").write_text("from llm2trt.b import f\n")
    (tmp_path / "llm2trt" / "b.py").write_text("def f():\n    from llm2trt import a\n")
    (tmp_path / "llm2trt" / "c.py").write_text("import llm2trt.a\n")
    assert cycles(import_graph(module_sources(tmp_path))) == [["llm2trt.a", "llm2trt.b"]]


def test_no_module_name_is_used_twice_below_the_stages() -> None:
    names: dict[str, list[str]] = {}
    for directory in ("llm2trt/core", "passes", "plugins"):
        for path in (ROOT / directory).rglob("*.py"):
            if path.name != "__init__.py":
                names.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


def test_the_package_top_level_holds_few_modules() -> None:
    assert sorted(p.name for p in (ROOT / "llm2trt").glob("*.py")) == ["__init__.py", "__main__.py", "entry.py"]
