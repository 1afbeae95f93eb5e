"""Q/DQ quantization on SmolLM2-135M: perplexity change per method against the fp32 artifact on two
texts, weight bytes against fp16, calibration time and peak RSS, what --quant auto chose, and the
TensorRT-RTX (sm89) build of each graph.

Perplexity (non-overlapping 512-token windows) on tests/data/text/eval.txt (Vim's user manual,
chapters 4-8) and on tests/data/text/heldout.txt (the GNU GPL v3, a text nothing here was tuned on).
Calibration on the built-in text (llm2trt/data/calib_default.txt: no --calib) or, for the configs
named `...@calib`, on tests/data/text/calib.txt (Vim's manual, chapters 2-3).
Each step's result is kept under --out and reused on a rerun; the table is printed at the end.
Run from the repository root (after scripts/setup.sh):
    python scripts/measure_quant.py [--no-build] [--only int8-sq,fp8] [--list]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from common import ROOT, TEXT, llm2trt_timed, smollm2_gguf

BASE = {  # name -> optimize arguments, calibrated (when the method calibrates) on the built-in text
    "int8-wo": ["--quant", "int8-wo"],
    "int8-sq": ["--quant", "int8-sq"],
    "fp8": ["--quant", "fp8"],
    "int4-rtn-g128": ["--quant", "int4-rtn", "--group-size", "128"],
    "int4-awq-g128": ["--quant", "int4-awq", "--group-size", "128"],
    "int4-gptq-g128": ["--quant", "int4-gptq", "--group-size", "128"],
    "auto-1": ["--quant", "auto", "--max-ppl-increase", "1"],
    "auto-3": ["--quant", "auto", "--max-ppl-increase", "3"],
    "int4-rtn-g32": ["--quant", "int4-rtn", "--group-size", "32"],
    "int4-awq-g32": ["--quant", "int4-awq", "--group-size", "32"],
    "int4-gptq-g32": ["--quant", "int4-gptq", "--group-size", "32"],
    # Mixed precision by measured sensitivity (scripts/quant_sensitivity.py): the layers whose
    # quantization costs the most perplexity stay in high precision.
    "int8-sq-keep-down": ["--quant", "int8-sq", "--keep", "lm_head", "--keep", "down_proj"],
    "fp8-keep-0-29": ["--quant", "fp8", "--keep", "lm_head", "--keep", r"layers\.(0|29)\."],
    "fp8-keep-0-1-28-29": ["--quant", "fp8", "--keep", "lm_head", "--keep", r"layers\.(0|1|28|29)\."],
}
CALIBRATED = ("int8-sq", "fp8", "int4-awq-g128", "int4-gptq-g128", "auto-1", "auto-3")
# How the result moves with the calibration tokens (the warning's threshold, min_calib_tokens).
SWEEP = {
    f"{name}-s{n}": [*BASE[name], "--calib-samples", str(n)]
    for name in ("int4-awq-g128", "int4-gptq-g128", "int8-sq")
    for n in (1, 2, 4, 8, 32)
}
CONFIGS = {
    **BASE,
    **{f"{name}@calib": [*BASE[name], "--calib", str(TEXT / "calib.txt")] for name in CALIBRATED},
    **SWEEP,
}
TEXTS = {"eval": TEXT / "eval.txt", "heldout": TEXT / "heldout.txt"}


def timed(*args: str | Path) -> tuple[float, float, str]:
    """`llm2trt ARGS`, which must succeed: seconds, peak RSS in MB, stdout."""
    run = llm2trt_timed(*args)
    return run.seconds, run.peak_rss_mb, run.stdout


def cached(path: Path, make: Any) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    result = make()
    path.write_text(json.dumps(result, indent=2))
    return dict(result)


def ppl(artifact: Path, text: Path) -> float:
    _s, _r, out = timed("eval", "ppl", artifact, "--text", text, "--json", "-q")
    return float(json.loads(out)["ppl"])


def ppls(artifact: Path) -> dict[str, float]:
    return {name: ppl(artifact, text) for name, text in TEXTS.items()}


def linear_bytes(artifact: Path) -> tuple[int, int]:
    """Bytes of the linear layers' weights (quantized payload + scales) and what fp16 would take."""
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    sizes = {t.name: (int(np.prod(t.dims)), t.data_type) for t in model.graph.initializer}
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.FLOAT8E4M3FN: 8}
    quantized = fp16 = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in sizes:
            continue
        count, dtype = sizes[node.input[0]]
        scale_count, scale_type = sizes[node.input[1]]
        quantized += count * bits[dtype] // 8 + scale_count * (4 if scale_type == onnx.TensorProto.FLOAT else 2)
        fp16 += 2 * count
    return quantized, fp16


def measure(name: str, args: list[str], source: Path, out: Path) -> dict[str, Any]:
    artifact = out / name
    run = llm2trt_timed("optimize", source, "-o", artifact, *args, "--force", "-q", ok=(0, 1))
    if run.returncode:  # e.g. the numeric check refusing an under-calibrated graph: a result too
        return {"failed": next((line for line in run.stderr.splitlines() if "error:" in line), "failed")}
    seconds, rss = run.seconds, run.peak_rss_mb
    manifest = json.loads((artifact / "manifest.json").read_text())
    quant = manifest["quantization"]
    plan = quant.get("plan")
    payload, fp16 = linear_bytes(artifact)
    row: dict[str, Any] = {
        "optimize_s": round(seconds, 1),
        "optimize_peak_rss_mb": round(rss),
        "calibration": quant.get("calibration"),
        "quantized_layers": len(quant["quantized"]),
        "smoothed": quant["smoothed"],
        "linear_bytes": payload,
        "linear_bytes_fp16": fp16,
        "data_bytes": (artifact / "model.onnx.data").stat().st_size,
        "ppl": ppls(artifact),
        "plan": {k: plan[k] for k in ("counts", "estimated", "measured", "weight_bytes", "weight_bytes_fp16", "groups")}
        if plan
        else None,
        "error_vs_rounding": quant.get("error_vs_rounding"),
        "measurements": plan["measurements"] if plan else None,
    }
    shutil.rmtree(artifact)  # 0.5 GB each: the numbers are kept
    return row


def build(name: str, out: Path) -> dict[str, Any]:
    """TensorRT-RTX (sm89) build of one quantized artifact: time, size, precision counts."""
    timed("build", out / name, "-o", out / f"{name}-engine", "--compute-capability", "sm89", "--force", "-q")
    info = json.loads((out / f"{name}-engine" / "build.json").read_text())
    keys = ("build_seconds", "engine_bytes", "matmul_precisions", "layer_precisions", "unfused_qdq")
    return {k: info[k] for k in keys}


# Bytes on disk against fp16: the fp16 artifact quantized without calibration. int4-awq stores what
# int4-rtn stores at the same group; int8-sq and fp8 what int8-wo stores, plus a scale per input.
BYTES = {
    "int8-wo": ["--quant", "int8-wo"],
    "int4-g128": ["--quant", "int4-rtn"],
    "int4-g32": ["--quant", "int4-rtn", "--group-size", "32"],
}


def disk_bytes(out: Path) -> dict[str, int]:
    fp16 = out / "fp16-onnx"
    if not (fp16 / "manifest.json").exists():
        timed("convert", smollm2_gguf(), "-o", fp16, "--dtype", "fp16", "--force", "-q")
    sizes = {"fp16": (fp16 / "model.onnx.data").stat().st_size}
    for name, args in BYTES.items():
        artifact = out / f"fp16-{name}"
        if not (artifact / "manifest.json").exists():
            timed("optimize", fp16, "-o", artifact, *args, "--force", "-q")
        sizes[name] = (artifact / "model.onnx.data").stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "quant")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--only", default=",".join(BASE))
    parser.add_argument("--list", action="store_true", help="print the configurations' names and stop")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{name}: {' '.join(argv)}" for name, argv in CONFIGS.items()))
        return
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = out / "fp32-onnx"
    if not (source / "manifest.json").exists():
        timed("convert", smollm2_gguf(), "-o", source, "--force", "-q")
    reference = out / "fp32"
    base = cached(
        out / "fp32.json",
        lambda: {"ppl": (timed("optimize", source, "-o", reference, "--force", "-q"), ppls(reference))[1]},
    )
    rows = {
        name: cached(out / f"{name}.json", lambda n=name: measure(n, CONFIGS[n], source, out))
        for name in args.only.split(",")
    }
    if not args.no_build:
        for name, row in rows.items():
            row["build"] = cached(out / f"{name}-build.json", lambda n=name: build(n, out))
    sizes = cached(out / "bytes.json", lambda: disk_bytes(out))
    print(
        f"SmolLM2-135M-Instruct, fp32 perplexity: eval.txt {base['ppl']['eval']:.4f}, "
        f"heldout.txt {base['ppl']['heldout']:.4f}"
    )
    print(
        f"{'config':<22} {'eval':>8} {'change':>8} {'heldout':>8} {'change':>8} {'linear MB':>10} {'vs fp16':>8} "
        f"{'calib s':>8} {'optimize s':>10} {'peak MB':>8}  plan / matmuls (TensorRT-RTX network)"
    )
    for name, row in rows.items():
        if "failed" in row:
            print(f"{name:<22} failed: {row['failed']}")
            continue
        change = {t: row["ppl"][t] / base["ppl"][t] - 1 for t in TEXTS}
        calib = row["calibration"]["seconds"] if row["calibration"] else 0.0
        built = row.get("build") or {}
        mms = ", ".join(f"{k} {v}" for k, v in sorted(built.get("matmul_precisions", {}).items()))
        plan = row.get("plan")
        if plan:
            mms = (
                ", ".join(f"{n} {c}" for c, n in plan["counts"].items())
                + f" (est. {plan['estimated']:+.2f}%, measured {plan['measured']:+.2f}% on the calibration text) "
                + mms
            )
        print(
            f"{name:<22} {row['ppl']['eval']:>8.4f} {change['eval']:>+8.2%} {row['ppl']['heldout']:>8.4f} "
            f"{change['heldout']:>+8.2%} {row['linear_bytes'] / 1e6:>10.1f} "
            f"{row['linear_bytes'] / row['linear_bytes_fp16']:>8.3f} {calib:>8.1f} {row['optimize_s']:>10.1f} "
            f"{row['optimize_peak_rss_mb']:>8}  {mms}"
        )
    print("weights on disk (model.onnx.data, quantized from the fp16 artifact; lm_head/embeddings stay fp16):")
    for name, size in sizes.items():
        print(f"  {name:<10} {size / 1e6:8.1f} MB  {size / sizes['fp16']:.3f} of fp16")


if __name__ == "__main__":
    main()
