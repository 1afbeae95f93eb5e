"""The 1.1B shape end to end (issue 12), behind the `slow` marker: `pytest -m slow tests/test_scale.py`
runs scripts/bench_scale.py (about 3 minutes and 12 GB of disk on 2 CPUs) and holds its table to
the targets. CI deselects it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_1b_shape_stays_within_its_memory_targets(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--dtype", "fp16", "--work", str(tmp_path)]
    table = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=1800).stdout
    ratio = {m[1].strip(): float(m[2]) for m in re.finditer(r"^(.{28}) .* ([\d.]+)x$", table, re.MULTILINE)}
    assert ratio["convert"] <= 1.5, table
    for stage in ("optimize (fusions)", "optimize --tp 2", "optimize --quant int4-rtn"):
        assert ratio[stage] <= 0.5, table
    build = float(re.search(r"build / TensorRT-RTX alone, peak RSS: ([\d.]+)x", table)[1])  # type: ignore[index]
    assert build <= 1.1, table
