"""Two runs writing the same output at once: one writes it, the other stops at once with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llm2trt.core.artifact import _output_lock
from tests.conftest import assert_clean_failure, run_cli


def test_a_second_run_on_a_locked_output_stops_at_once(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fused"
    with _output_lock(out):
        assert (tmp_path / ".fused.lock").read_text() == str(os.getpid())
        result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--no-check")
        assert_clean_failure(result, f"another llm2trt run (pid {os.getpid()}) is writing {out}")
        assert result.exit_code == 2
        assert not out.exists()
    assert not (tmp_path / ".fused.lock").exists()  # released and removed
    assert run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--no-check").exit_code == 0


def test_two_processes_racing_for_one_output_leave_one_whole_artifact(tmp_path: Path) -> None:
    out = tmp_path / "gpt2"
    args = [sys.executable, "-m", "llm2trt", "convert", "tiny:gpt2", "-o", str(out), "--force", "-q"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    # Both finish (one after the other, --force), or the later one is turned away while the first writes.
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            lines = [line for line in err.splitlines() if line.startswith("llm2trt: error:")]
            assert len(lines) == 1 and "is writing" in lines[0], err
    manifest = json.loads((out / "manifest.json").read_text())
    data = out / manifest["graphs"][next(iter(manifest["graphs"]))]["external_data"][0]
    assert data.stat().st_size > 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # no staging dir, no lock, no old copy
