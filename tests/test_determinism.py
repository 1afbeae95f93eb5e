"""Two runs of each command on the same input write byte-identical ONNX files, weights and manifests
(durations aside: the manifest keeps them under `timings`, and this compares the rest byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

RUNS = {
    "convert": ["convert", "tiny:llama"],
    "optimize": ["optimize", "{convert}"],
    "optimize --tp 2": ["optimize", "{convert}", "--tp", "2", "--no-check"],
    "optimize --quant int4-rtn --plugin": [
        "optimize",
        "{convert}",
        "--quant",
        "int4-rtn",
        "--group-size",
        "16",
        "--plugin",
        "Int4GroupGemm",
    ],
}


def _without_timings(path: Path) -> bytes:
    data = json.loads(path.read_text())
    assert "timings" in data and all("seconds" not in p for p in data["passes"])
    del data["timings"]
    return json.dumps(data, sort_keys=False).encode()


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name == "manifest.json":
            out[str(path.relative_to(root))] = _without_timings(path)
        elif path.is_file() and (path.suffix in (".onnx", ".data") or path.name.endswith(".onnx.data")):
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def test_every_command_writes_the_same_bytes_twice(tmp_path: Path) -> None:
    made: dict[str, list[Path]] = {}
    for run in (0, 1):
        for name, args in RUNS.items():
            out = tmp_path / f"{run}" / name.replace(" ", "_")
            filled = [a.format(convert=made["convert"][run]) if "{" in a else a for a in args]
            result = run_cli(*filled, "-o", out, "-q")
            assert result.exit_code == 0, result.stderr
            made.setdefault(name, []).append(out)
    for name, (first, second) in made.items():
        a, b = _files(first), _files(second)
        assert sorted(a) == sorted(b) and len(a) >= 3, (name, sorted(a))
        different = [f for f in a if a[f] != b[f]]
        assert different == [], f"{name}: {different} differ between two runs"
