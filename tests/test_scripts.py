"""The scripts under scripts/: they reach llm2trt through its public names only and never import the
test suite (a reorganisation of either must not silently break them), every one compiles, every
llm2trt name they import exists, and each answers --help. Most need a GPU or minutes to run: this
is what can be checked of them here, in seconds."""

from __future__ import annotations

import ast
import concurrent.futures
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_problem(module: str) -> str | None:
    """Why importing `module` is refused: the test suite, or a private part of llm2trt."""
    parts = module.split(".")
    if parts[0] == "tests":
        return f"imports from the test suite ({module})"
    if parts[0] == "llm2trt" and any(_private(p) for p in parts):
        return f"imports a private llm2trt module ({module})"
    return None


def _from_import(node: ast.ImportFrom) -> tuple[list[str], list[str]]:
    module = node.module or ""
    problem = _module_problem(module)
    if module.split(".")[0] != "llm2trt":
        return [problem] if problem else [], []
    private = [f"imports a private llm2trt name ({module}.{a.name})" for a in node.names if _private(a.name)]
    return ([problem] if problem else []) + private, [a.asname or a.name for a in node.names]


def _called_import(node: ast.Call) -> str | None:
    """The module an `importlib.import_module("...")` or `__import__("...")` call names."""
    func, args = node.func, node.args
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if called in ("import_module", "__import__") and args and isinstance(args[0], ast.Constant):
        return str(args[0].value)
    return None


def _import_checks(node: ast.AST) -> tuple[list[str], list[str]]:
    """(refused imports, names bound to llm2trt objects) of one statement or call."""
    if isinstance(node, ast.Import):
        problems = [p for p in (_module_problem(a.name) for a in node.names) if p]
        return problems, [a.asname or "llm2trt" for a in node.names if a.name.split(".")[0] == "llm2trt"]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return _from_import(node)
    if isinstance(node, ast.Call) and (target := _called_import(node)):
        problem = _module_problem(target)
        return [problem] if problem else [], []
    return [], []


def violations(source: str, filename: str = "<script>") -> list[str]:
    """`filename:line: problem` for each import of a private llm2trt name (`from llm2trt.x import _y`,
    a private module, or `_y` reached as an attribute of something imported from llm2trt, such as
    `llm2trt.x._y` or `q._y` after `from llm2trt.passes import qdq as q`) and each import from tests/."""
    tree = ast.parse(source, filename)
    problems: list[tuple[int, str]] = []
    bound: set[str] = set()
    for node in ast.walk(tree):
        refused, names = _import_checks(node)
        problems += [(getattr(node, "lineno", 0), problem) for problem in refused]
        bound.update(names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base: ast.expr = node
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                problems.append((node.lineno, f"reaches a private llm2trt name ({ast.unparse(node)})"))
    return [f"{filename}:{line}: {problem}" for line, problem in sorted(problems)]


def script_violations(paths: list[Path]) -> list[str]:
    return [v for path in paths for v in violations(path.read_text(), path.name)]


def test_scripts_import_no_private_llm2trt_name_nor_tests() -> None:
    assert SCRIPTS, "no scripts found"
    assert script_violations(SCRIPTS) == []


PLANTED = [
    "from llm2trt.generate.driver import _decoder_graph",
    "from llm2trt.generate.driver import Sampling, _decoder_graph as graph_of",
    "import llm2trt.generate.driver\nllm2trt.generate.driver._decoder_graph(manifest)",
    "from llm2trt.passes import qdq as q\nq._expand(scale, method, 0)",
    "from llm2trt.generate import driver\ndriver._Rows.start(1, [])",
    "import llm2trt._internal",
    "from llm2trt._internal import helper",
    "from tests.corrupt import corrupt_linear",
    "from tests import fake_quant",
    "import tests.fake_quant as fq",
    "import importlib\nimportlib.import_module('tests.corrupt')",
]
CLEAN = [
    "from llm2trt.generate.driver import Sampling, generate_ids",
    "import llm2trt\nprint(llm2trt.__version__)",
    "from common import smollm2_gguf\nsmollm2_gguf()._private",  # not an llm2trt object
    "import testsuite\nfrom testsuite import x",
    "class A:\n    def f(self):\n        return self._g()",
]


@pytest.mark.parametrize("source", PLANTED)
def test_planted_violation_is_found(source: str) -> None:
    assert len(violations(source)) == 1, violations(source)


@pytest.mark.parametrize("source", CLEAN)
def test_public_imports_pass(source: str) -> None:
    assert violations(source) == []


def test_planted_script_fails_the_check(tmp_path: Path) -> None:
    """The check over a directory holding real scripts and one planted offender names the offender alone."""
    for script in SCRIPTS[:3]:
        (tmp_path / script.name).write_text(script.read_text())
    planted = tmp_path / "planted.py"
    planted.write_text('"""A script."""\n\nfrom llm2trt.generate.driver import _decoder_graph\n')
    found = script_violations(sorted(tmp_path.glob("*.py")))
    assert found == ["planted.py:3: imports a private llm2trt name (llm2trt.generate.driver._decoder_graph)"]


def test_scripts_compile() -> None:
    """GPU-only scripts cannot run here; they must at least compile."""
    for script in SCRIPTS:
        compile(script.read_text(), str(script), "exec")


def _llm2trt_names() -> set[tuple[str, str]]:
    names = set()
    for script in SCRIPTS:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llm2trt":
                names |= {(node.module, alias.name) for alias in node.names}
    return names


def test_imported_llm2trt_names_exist() -> None:
    """Every llm2trt name a script imports, inside functions too (where --help never reaches)."""
    missing = []
    for module, name in sorted(_llm2trt_names()):
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] != "llm2trt":
                continue  # an optional dependency this machine lacks (full TensorRT, say)
            missing.append(f"{module}: {exc}")
            continue
        if not hasattr(imported, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{module}.{name}")
    assert missing == []


def _has_argparse(script: Path) -> bool:
    return "ArgumentParser" in {
        node.attr if isinstance(node, ast.Attribute) else node.id
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.Attribute | ast.Name)
    }


def _help(script: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    argv = [sys.executable, str(script), "--help"]
    return script, subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_scripts_answer_help() -> None:
    """`python scripts/NAME.py --help`, as the scripts are run (their own directory first on
    sys.path), exits 0 with a usage line: the imports at the top of each script resolve."""
    with_cli = [s for s in SCRIPTS if _has_argparse(s)]
    assert with_cli == SCRIPTS, f"scripts without a command line: {sorted(set(SCRIPTS) - set(with_cli))}"
    # One run per core: each is mostly the CPU-bound import of torch or onnxruntime.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(_help, with_cli))
    failed = [
        f"{script.name}: exit {proc.returncode}\n{proc.stderr[-1500:]}"
        for script, proc in results
        if proc.returncode != 0 or "usage:" not in proc.stdout
    ]
    assert failed == [], "\n".join(failed)


def test_bench_serve_runs_on_the_tiny_llama(tmp_path: Path) -> None:
    """scripts/bench_serve.py end to end: the static reference, a server it starts and stops (exit 0),
    two levels of streams through the openai client without an error, its JSON; a wrong path is one
    line, no traceback."""
    import json

    from tests.conftest import run_cli

    script = str(ROOT / "scripts" / "bench_serve.py")
    missing = subprocess.run(
        [sys.executable, script, str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("bench_serve: ") and len(missing.stderr.strip().splitlines()) == 1
    artifact, out = tmp_path / "llama", tmp_path / "bench.json"
    assert run_cli("convert", "tiny:llama", "-o", artifact, "-q").exit_code == 0
    argv = [script, str(artifact), "--concurrency", "1", "4", "--requests-per-level", "6", "--json", str(out)]
    argv += ["--prompt-tokens", "4", "12", "--output-tokens", "4", "8"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [s["batch"] for s in result["static"]] == [1, 16]
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert (level["requests"], level["errors"]) == (6, 0), level["first_error"]
        assert 6 <= level["tokens"] <= 6 * 8  # an EOS may end a stream early
        assert level["server"]["engine_steps"] > 0
