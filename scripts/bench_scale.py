"""Memory and time per stage for the ~1.1B Llama shape (22 layers, hidden 2048, intermediate 5632,
32/4 heads, vocab 32000; random weights): convert, optimize (fusions; --tp 2; int4-rtn) and build
(TensorRT-RTX, sm89). Still missing: TensorRT-RTX alone building the same ONNX (build's floor).

    python scripts/bench_scale.py --dtype fp16 --work /tmp/scale      # one table

Each stage runs as its own process; its peak RSS is the kernel's high-water mark for that process
and everything it waited for (os.wait4), so a build worker's memory counts toward `build`.
Ratios are over the model's weight bytes in the stage's input (the converted artifact's data files).
Targets (issue 12): passes <= 0.5x, export <= 1.5x, build <= 1.1x of TensorRT-RTX alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_stage(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one process and its descendants."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({status}): {err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def data_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.rglob("*.data"))


def prepare(work: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_decode", HERE / "bench_decode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_decode"] = module
    spec.loader.exec_module(module)
    return Path(module.prepare("1.1b", work, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--skip", nargs="*", default=[], help="stages to leave out (build, tp, int4)")
    opts = parser.parse_args()
    work = opts.work / opts.dtype
    work.mkdir(parents=True, exist_ok=True)
    hf = prepare(opts.work)
    cli = [sys.executable, "-m", "llm2trt"]
    onnx_dir, fused = work / "onnx", work / "fused"
    rows: list[tuple[str, float, int, int]] = []
    hf_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    seconds, rss = run_stage([*cli, "convert", str(hf), "-o", str(onnx_dir), "--dtype", opts.dtype, "--force", "-q"])
    model_bytes = data_bytes(onnx_dir)
    rows.append(("convert", seconds, rss, model_bytes))
    stages = [("optimize (fusions)", ["optimize", str(onnx_dir), "-o", str(fused), "--no-check"])]
    if "tp" not in opts.skip:
        stages.append(
            ("optimize --tp 2", ["optimize", str(onnx_dir), "-o", str(work / "tp2"), "--tp", "2", "--no-check"])
        )
    if "int4" not in opts.skip:
        stages.append(
            (
                "optimize --quant int4-rtn",
                ["optimize", str(onnx_dir), "-o", str(work / "int4"), "--quant", "int4-rtn", "--no-check"],
            )
        )
    if "build" not in opts.skip:
        stages.append(
            ("build (sm89)", ["build", str(fused), "-o", str(work / "engine"), "--compute-capability", "sm89"])
        )
    for name, args in stages:
        seconds, rss = run_stage([*cli, *args, "--force", "-q"])
        rows.append((name, seconds, rss, model_bytes))
    print(
        f"\n1.1B Llama shape, {opts.dtype}: {model_bytes / 1e9:.2f} GB of weights "
        f"({hf_bytes / 1e9:.2f} GB safetensors);"
    )
    print(f"{os.cpu_count()} CPUs; peak RSS per stage process (and its children)")
    print(f"{'stage':<28} {'seconds':>8} {'peak RSS GB':>12} {'RSS / model':>12}")
    for name, seconds, rss, base in rows:
        print(f"{name:<28} {seconds:>8.1f} {rss / 1e9:>12.2f} {rss / base:>11.2f}x")


if __name__ == "__main__":
    main()
