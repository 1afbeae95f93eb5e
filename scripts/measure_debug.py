"""Layer-output debugging on SmolLM2-135M (fp32, CPU): time and peak RSS of `compare --mark all`
and `debug bisect`, bisect's rounds, and the golden file's size against Polygraphy's JSON.

One linear of layer 17 of 30 is corrupted (one weight, +10 x max|W|) in a copy of the artifact;
both commands must name it. Run from the repository root (after scripts/setup.sh):
    python scripts/measure_debug.py [--artifact DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import llm2trt_argv, llm2trt_timed, smollm2_gguf, time_v

MODULE = "model.layers.17.mlp.down_proj"


def timed(*args: str | Path) -> tuple[float, float, int, str]:
    """`llm2trt ARGS`: seconds, peak RSS in MB, exit code (1: a breach, which is a result here), stdout."""
    run = llm2trt_timed(*args, ok=(0, 1))
    return run.seconds, run.peak_rss_mb, run.returncode, run.stdout


def polygraphy_json_bytes(golden: Path, work: Path) -> tuple[int, int]:
    """Polygraphy's JSON for the same tensors: the outputs (`--save-outputs`) and the inputs
    (`--save-inputs`), as `polygraphy run` writes them."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    from llm2trt.compare.golden import Golden

    opened = Golden(golden)
    outputs = {t.name: opened.array(t) for t in opened.index.compared()}
    results = RunResults([("onnxrt-runner", [IterationResult(outputs, runner_name="onnxrt-runner")])])
    results.save(str(work / "outputs.json"))
    save_json([opened.feeds()], str(work / "inputs.json"))
    opened.close()
    return (work / "outputs.json").stat().st_size, (work / "inputs.json").stat().st_size


LOADER = """
import numpy as np

def load_data():
    with np.load({path!r}) as npz:
        yield {{name: npz[name] for name in npz.files}}
"""


def long_sequence_rows(
    artifact: Path, work: Path, batch: int, sequence: int
) -> list[tuple[str, float, float, int, str]]:
    """Marking the same module outputs at a long sequence: llm2trt's rounds against Polygraphy
    holding every marked tensor at once (`polygraphy run --onnxrt --onnx-outputs ...`)."""
    import onnx

    from llm2trt.compare.driver import Setup
    from llm2trt.compare.marks import GraphMap

    setup = Setup.of(artifact, batch, sequence, 0)
    np.savez(work / "feeds.npz", **setup.feeds)
    (work / "loader.py").write_text(LOADER.format(path=str(work / "feeds.npz")))
    graph_map = GraphMap.of(onnx.load(str(artifact / "model.onnx"), load_external_data=False))
    names = [m.tensor for m in graph_map.marks] + [o.tensor for o in graph_map.outputs]
    shape = ("--batch", str(batch), "--sequence", str(sequence))
    rows = []
    s, rss, code, _ = timed("compare", artifact, *shape, "-q")
    rows.append((f"llm2trt compare, outputs only, {batch}x{sequence}", s, rss, code, "-"))
    s, rss, code, out = timed("compare", artifact, "--mark", "all", *shape, "-q", "--json")
    data = json.loads(out)
    rows.append(
        (f"llm2trt compare --mark all, {batch}x{sequence}", s, rss, code, f"{data['segments']} segments, torch+ort")
    )
    cmd = [
        "polygraphy",
        "run",
        str(artifact / "model.onnx"),
        "--onnxrt",
        "--data-loader-script",
        str(work / "loader.py"),
    ]
    for label, extra in (("outputs only", []), (f"{len(names)} marks", ["--onnx-outputs", *names])):
        run = time_v([*cmd, *extra])
        rows.append((f"polygraphy run --onnxrt, {label}", run.seconds, run.peak_rss_mb, run.returncode, "ort only"))
    return rows


Row = tuple[str, float, float, int, str]


def print_rows(rows: list[Row], last: str) -> None:
    print(f"| {'command':44} | {'seconds':>7} | {'peak RSS MB':>11} | exit | {last} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 13}|------|{'-' * (len(last) + 2)}|")
    for name, seconds, peak, code, note in rows:
        print(f"| {name:44} | {seconds:7.1f} | {peak:11.0f} | {code:4d} | {note} |")


def debug_rows(artifact: Path, broken: Path, golden: Path) -> tuple[list[Row], dict[str, Any]]:
    """The commands on the clean and the corrupted artifact; each must name the corrupted module."""
    rows: list[Row] = []
    s, rss, code, _ = timed("compare", artifact, "-q")
    rows.append(("compare (outputs only), clean", s, rss, code, "-"))
    s, rss, code, out = timed("compare", artifact, "--mark", "all", "--save-golden", golden, "-q", "--json")
    data = json.loads(out)
    rows.append(("compare --mark all --save-golden, clean", s, rss, code, f"{data['marked']} marks"))
    s, rss, code, out = timed("compare", broken, "--mark", "all", "-q", "--json")
    breach = json.loads(out)["first_breach"]
    rows.append(("compare --mark all, corrupted", s, rss, code, f"first breach {breach['module']}"))
    s, rss, code, out = timed("debug", "bisect", broken, "-q", "--json")
    found = json.loads(out)
    rows.append(("debug bisect, corrupted", s, rss, code, f"{found['module']} in {found['rounds']} rounds"))
    s, rss, code, _ = timed("compare", artifact, "--check-golden", golden, "-q")
    rows.append(("compare --check-golden, clean", s, rss, code, "-"))
    s, rss, code, out = timed("compare", broken, "--check-golden", golden, "-q", "--json")
    regressed = json.loads(out)["first_breach"]
    rows.append(("compare --check-golden, corrupted", s, rss, code, f"regression at {regressed['module']}"))
    if not breach["module"] == found["module"] == regressed["module"] == MODULE:
        sys.exit(f"the corrupted module {MODULE} was not named: {breach}, {found}, {regressed}")
    return rows, data


def golden_sizes(golden: Path, work: Path, data: dict[str, Any]) -> None:
    golden_bytes = golden.stat().st_size
    out_json, in_json = polygraphy_json_bytes(golden, work)
    with np.load(golden) as npz:
        raw = sum(npz[name].nbytes for name in npz.files if name != "golden.json")
    print(f"\ngolden (--mark all): {data['marked']} marks + {len(data['results']) - data['marked']} outputs\n")
    print("| file | MB | vs golden |")
    print("|------|----|-----------|")
    print(f"| llm2trt golden .npz (inputs + tensors + index) | {golden_bytes / 1e6:.1f} | 1.00x |")
    print(f"| raw array bytes | {raw / 1e6:.1f} | {raw / golden_bytes:.2f}x |")
    both = out_json + in_json
    print(
        f"| Polygraphy JSON (outputs {out_json / 1e6:.1f} + inputs {in_json / 1e6:.1f}) | {both / 1e6:.1f} | "
        f"{both / golden_bytes:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="An fp32 SmolLM2 artifact (default: convert one).")
    args = parser.parse_args()
    from llm2trt.compare.faults import corrupt_linear

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = args.artifact
        if artifact is None:
            artifact = work / "smollm2"
            subprocess.run(llm2trt_argv("convert", smollm2_gguf(), "-o", artifact, "-q"), check=True)
        broken = corrupt_linear(artifact, MODULE, work / "broken")
        golden = work / "golden.npz"
        rows, data = debug_rows(artifact, broken, golden)
        print(f"SmolLM2-135M fp32, CPU, batch 3 x sequence 12; corrupted: {MODULE} (one weight)\n")
        print_rows(rows, "result")
        print("\nThe same marks at batch 4 x sequence 512 (plus 256 cached tokens):\n")
        print_rows(long_sequence_rows(artifact, work, 4, 512), "note")
        golden_sizes(golden, work, data)


if __name__ == "__main__":
    main()
