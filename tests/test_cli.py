"""The CLI: --help without torch or TensorRT, --json on every command, inspect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli, run_json

COMMANDS = ["convert", "optimize", "build", "compare", "inspect"]


def test_help_works_without_torch_or_tensorrt() -> None:
    # Block the heavy imports outright: --help must not need them.
    code = (
        "import sys\n"
        "for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'transformers', 'onnxruntime'):\n"
        "    sys.modules[m] = None\n"
        "from click.testing import CliRunner\n"
        "from llm2trt.cli.main import cli\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "    assert 'Usage:' in r.output\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_shared_options_on_every_command() -> None:
    for command in COMMANDS:
        text = run_cli(command, "--help").stdout
        for option in ("--json", "--verbose", "--quiet"):
            assert option in text, (command, option)


def test_inspect_reports_io_ops_and_passes(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "opt"
    assert run_cli("optimize", artifacts["tiny:llama"], "-o", out, "-q").exit_code == 0
    code, info = run_json("inspect", out)
    assert code == 0
    assert info["manifest"]["architecture"] == "llama"
    assert [t["name"] for t in info["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]  # then the cache
    assert info["inputs"][0]["shape"] == ["batch", "sequence"]
    assert info["op_counts"]["MatMul"] >= 14 and info["nodes"] == sum(info["op_counts"].values())
    assert [p["name"] for p in info["manifest"]["passes"]][:1] == ["constant_folding"]
    assert info["report"]["nodes_after"] == info["nodes"]
    text = run_cli("inspect", out).stdout
    assert "architecture  llama (LlamaForCausalLM" in text and "input         input_ids: int64[batch, sequence]" in text


def test_console_script_exit_codes(artifacts: dict[str, Path], tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "llm2trt"
    ok = subprocess.run(
        [str(exe), "inspect", str(artifacts["tiny:vit"]), "--json"], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0 and ok.stdout.startswith("{")
    bad = subprocess.run([str(exe), "inspect", str(tmp_path / "missing")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"llm2trt: error: artifact directory does not exist: {tmp_path / 'missing'}"
    ]


def test_group_help_lists_every_command_once() -> None:
    from llm2trt.cli.main import cli

    text = run_cli("--help").stdout
    listed = [line.split()[0] for line in text.split("Commands:")[1].strip().splitlines()]
    assert sorted(listed) == sorted(cli.commands)  # plugins and refit included
    for name in cli.commands:  # once: no second, hand-written list above click's
        assert sum(line.split()[:1] == [name] for line in text.splitlines()) == 1, (name, text)


def test_stage_options_come_before_the_common_ones() -> None:
    """A command's own options first (optimize's --quant and --calib among them), then --json, -v, -q."""
    import re

    for command in [*COMMANDS, "generate", "plugins", "refit"]:
        text = run_cli(command, "--help").stdout
        options = re.findall(r"^  (-\w, )?(--[\w-]+)", text, flags=re.MULTILINE)
        names = [name for _short, name in options]
        assert names[-4:] == ["--json", "--verbose", "--quiet", "--help"], (command, names)
    optimize = run_cli("optimize", "--help").stdout
    assert optimize.index("--quant") < optimize.index("--json")
    assert optimize.index("--calib-samples") < optimize.index("--json")


def test_group_help_imports_no_numpy_onnx_or_torch() -> None:
    """`llm2trt --help` and the CLI's import stay light: the option vocabularies (dtypes, quantization
    methods) are read when a command's help or the command itself needs them."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from llm2trt.cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = {'numpy', 'onnx', 'ml_dtypes', 'torch', 'transformers', 'onnxruntime', 'tensorrt'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
