"""Memory and time per stage for the ~1.1B Llama shape (22 layers, hidden 2048, intermediate 5632,
32/4 heads, vocab 32000; random weights): convert, optimize (fusions; --tp 2; int4-rtn) and build
(TensorRT-RTX, sm89), then TensorRT-RTX alone building the same ONNX with the same profiles
(`scripts/trt_floor.py`: build's floor). fp32 also checks the artifact against transformers
(`llm2trt compare`, a short input).

    python scripts/bench_scale.py --dtype fp16 --work /tmp/scale      # one table
    python scripts/bench_scale.py --dtype fp32 --work /tmp/scale --skip tp int4 build

Each stage runs as its own process; its peak RSS is the kernel's high-water mark for that process
and everything it waited for (os.wait4), so a build worker's memory counts toward `build`.
Ratios are over the model's weight bytes in the stage's input (the converted artifact's data files).
Targets: passes <= 0.5x, export <= 1.5x, build <= 1.1x of TensorRT-RTX alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hf_checkpoint, llm2trt_argv

HERE = Path(__file__).resolve().parent


def run_stage(argv: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of one process and its descendants (os.wait4's high-water
    mark; stdout goes through a file so nothing waits on a pipe)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if status != 0:
            raise SystemExit(f"{' '.join(argv[:4])} failed ({status}): {err.read()[-2000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def data_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.rglob("*.data"))


Row = tuple[str, float, int]  # stage, seconds, peak RSS bytes


def optimize_stages(onnx_dir: Path, work: Path, skip: list[str]) -> list[tuple[str, list[str]]]:
    """The passes measured without their numeric check (ONNX Runtime's session is not a pass)."""
    stages = [("optimize (fusions)", ["optimize", str(onnx_dir), "-o", str(work / "fused"), "--no-check"])]
    if "tp" not in skip:
        stages.append(
            ("optimize --tp 2", ["optimize", str(onnx_dir), "-o", str(work / "tp2"), "--tp", "2", "--no-check"])
        )
    if "int4" not in skip:
        stages.append(
            (
                "optimize --quant int4-rtn",
                ["optimize", str(onnx_dir), "-o", str(work / "int4"), "--quant", "int4-rtn", "--no-check"],
            )
        )
    if "build" not in skip:
        stages.append(
            ("build (sm89)", ["build", str(work / "fused"), "-o", str(work / "engine"), "--compute-capability", "sm89"])
        )
    return stages


def floor(work: Path, rows: list[Row], notes: list[str]) -> None:
    """TensorRT-RTX alone on the fused graph, with the profiles `build` recorded."""
    record = work / "engine" / "build.json"
    seconds, rss, out = run_stage(
        [sys.executable, str(HERE / "trt_floor.py"), str(work / "fused" / "model.onnx"), str(record)]
    )
    rows.append(("TensorRT-RTX alone (floor)", seconds, rss))
    built = json.loads(record.read_text())
    notes.append(
        f"build: {built['network_layers']:,} layers, {built['engine_bytes'] / 1e6:,.0f} MB engine, "
        f"{built['total_seconds']:.1f} s; TensorRT-RTX alone: {out.strip().splitlines()[-1]}"
    )
    notes.append(f"build / TensorRT-RTX alone, peak RSS: {rows[-2][2] / rows[-1][2]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--skip", nargs="*", default=[], help="stages to leave out (build, tp, int4, compare)")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    work = opts.work / opts.dtype
    work.mkdir(parents=True, exist_ok=True)
    if opts.prepare_only:
        hf_checkpoint("1.1b", opts.work)
        return
    # In a child: a process forked from one that held the 1.1B model in memory would report that
    # high-water mark as its own (Linux keeps ru_maxrss across exec).
    subprocess.run([sys.executable, __file__, "--work", str(opts.work), "--prepare-only"], check=True)
    hf = hf_checkpoint("1.1b", opts.work)
    onnx_dir = work / "onnx"
    seconds, rss, _out = run_stage(llm2trt_argv("convert", hf, "-o", onnx_dir, "--dtype", opts.dtype, "--force", "-q"))
    rows: list[Row] = [("convert", seconds, rss)]
    notes: list[str] = []
    for name, args in optimize_stages(onnx_dir, work, opts.skip):
        seconds, rss, _out = run_stage(llm2trt_argv(*args, "--force", "-q"))
        rows.append((name, seconds, rss))
    if "build" not in opts.skip:
        floor(work, rows, notes)
    if opts.dtype == "fp32" and "compare" not in opts.skip:
        seconds, rss, out = run_stage(llm2trt_argv("compare", onnx_dir, "--json"))
        rows.append(("compare (transformers, ORT)", seconds, rss))
        notes.append(f"fp32 artifact vs transformers: max relative error {json.loads(out)['main_max_rel_err']:.2e}")
    model_bytes = data_bytes(onnx_dir)
    hf_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    print(f"\n1.1B Llama shape, {opts.dtype}: {model_bytes / 1e9:.2f} GB of weights", end=" ")
    print(f"({hf_bytes / 1e9:.2f} GB safetensors);")
    print(f"{os.cpu_count()} CPUs; peak RSS per stage process (and its children)")
    print(f"{'stage':<28} {'seconds':>8} {'peak RSS GB':>12} {'RSS / model':>12}")
    for name, seconds, rss in rows:
        print(f"{name:<28} {seconds:>8.1f} {rss / 1e9:>12.2f} {rss / model_bytes:>11.2f}x")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
