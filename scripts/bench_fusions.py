"""ONNX Runtime latency of the unfused export, llm2trt's fused graph, and onnxruntime.transformers'
optimizer output from the same export, for a mid-size GPT-2 and Llama (random weights).

Prints one table; ratios are from the same run. Run on the CPU and on a GPU:

    python scripts/bench_fusions.py                                   # CPU, fp32
    python scripts/bench_fusions.py --provider cuda --dtype fp16      # GPU (onnxruntime-gpu)
    python scripts/bench_fusions.py --layers 2 --shapes 1x16 --runs 3 # a quick smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from common import median_ms, print_columns, work_dir

from llm2trt.convert.export import convert
from llm2trt.convert.sources import resolve_model, spec_and_config
from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.numerics import normwise_rel_err, ort_session
from llm2trt.exporters import ExportSpec
from llm2trt.optimize.driver import optimize

VARIANTS = ("unfused", "fused", "ort-opt")


def make_model(kind: str, layers: int, hidden: int, heads: int, kv_heads: int, work: Path) -> Path:
    """A random-weight Hugging Face directory of the given shape."""
    import torch
    import transformers

    torch.manual_seed(0)  # before the weights are drawn: the same model every run
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=hidden * 8 // 3 // 64 * 64,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
        model = transformers.LlamaForCausalLM(config)
    path = work / f"hf-{kind}"
    model.save_pretrained(str(path))
    return path


def ort_transformers_optimize(src: Path, dst: Path, heads: int, hidden: int) -> dict[str, int]:
    """onnxruntime.transformers' optimizer on the same export; returns its fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(
            str(src), model_type="gpt2", num_heads=heads, hidden_size=hidden, only_onnxruntime=False
        )
    dst.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=True)
    ops: dict[str, int] = {}
    for node in optimized.model.graph.node:
        if node.domain == "com.microsoft" or node.op_type in ("LayerNormalization", "Gelu", "Attention"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def providers_for(provider: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]


def placement(path: Path, feeds: dict[str, np.ndarray], provider: str) -> dict[str, dict[str, int]]:
    """Which execution provider ran each op type, read from one profiled run (the library's
    sessions are never profiled: this one is made here)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    sess = ort.InferenceSession(str(path), options, providers=providers_for(provider))
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict[str, dict[str, int]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "op_name" in args and event.get("name", "").endswith("_kernel_time"):
            per_op = seen.setdefault(args["op_name"], {})
            ep = args.get("provider", "?").replace("ExecutionProvider", "")
            per_op[ep] = per_op.get(ep, 0) + 1
    return seen


def time_session(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], provider: str, runs: int, warmup: int
) -> tuple[float, np.ndarray]:
    """Median wall time of one inference (IO binding: inputs live on the device beforehand)."""
    device = "cuda" if provider == "cuda" else "cpu"
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    outputs = [o.name for o in sess.get_outputs()]
    for name in outputs:
        binding.bind_output(name, device)
    run = functools.partial(sess.run_with_iobinding, binding)
    ms = median_ms(run, runs, warmup=warmup, before=binding.synchronize_inputs, after=binding.synchronize_outputs)
    return ms, binding.copy_outputs_to_cpu()[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4, help="Llama's KV heads (GQA)")
    parser.add_argument("--shapes", default="1x128,8x128,1x512,8x512", help="BATCHxSEQ,...")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--work", type=Path, help="keep the models here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Prepared:
    """One model's three variants on disk, and what makes sample inputs for them."""

    kind: str
    paths: dict[str, Path]  # variant -> artifact directory (model.onnx inside)
    spec: ExportSpec
    config: Any
    graph: GraphSpec

    def feeds(self, batch: int, seq: int) -> dict[str, np.ndarray]:
        return self.spec.sample_inputs(self.config, self.graph, batch, seq, seed=0)


def prepare(kind: str, args: argparse.Namespace, work: Path) -> Prepared:
    """Export a random-weight model, fuse it with llm2trt and with onnxruntime.transformers; say what each fused."""
    start = time.perf_counter()
    hf = make_model(kind, args.layers, args.hidden, args.heads, args.kv_heads, work)
    paths = {v: work / f"{kind}-{v}" for v in VARIANTS}
    convert(resolve_model(str(hf)), paths["unfused"], dtype=DType.parse(args.dtype), force=True)
    result = optimize(paths["unfused"], paths["fused"], force=True, check=False, allow_missing_fusions=True)
    fusions = next(iter(result.reports.values())).fusions
    ort_ops = ort_transformers_optimize(paths["unfused"] / "model.onnx", paths["ort-opt"], args.heads, args.hidden)
    print(
        f"# {kind}: {args.layers} layers, hidden {args.hidden}, {args.dtype}; prepared in "
        f"{time.perf_counter() - start:.0f} s; llm2trt fusions "
        f"{ {k: v for k, v in fusions.items() if v} }; onnxruntime.transformers ops {ort_ops}",
        flush=True,
    )
    manifest = Manifest.read(paths["unfused"])
    spec, config = spec_and_config(manifest)
    return Prepared(kind, paths, spec, config, manifest.graph())


def print_placement(model: Prepared, provider: str) -> None:
    """Which ops of each variant ran only on the CPU provider, from one profiled run at 1 x 16."""
    probe_feeds = model.feeds(1, 16)
    for v in VARIANTS:
        where = placement(model.paths[v] / "model.onnx", probe_feeds, provider)
        cpu = {op: n["CPU"] for op, n in where.items() if "CPU" in n and len(n) == 1}
        print(f"#   {v}: ops that ran only on the CPU provider: {cpu or 'none'}", flush=True)


def bench_shape(
    model: Prepared, sessions: dict[str, ort.InferenceSession], batch: int, seq: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: every variant timed on the same inputs, and the fused graphs' error against the unfused one."""
    feeds = model.feeds(batch, seq)
    times, outs = {}, {}
    for v in VARIANTS:
        times[v], outs[v] = time_session(sessions[v], feeds, args.provider, args.runs, args.warmup)
    row = {
        "model": model.kind,
        "batch": batch,
        "seq": seq,
        **{f"{v}_ms": times[v] for v in VARIANTS},
        "unfused/fused": times["unfused"] / times["fused"],
        "ort-opt/fused": times["ort-opt"] / times["fused"],
        "fused_err": normwise_rel_err(outs["fused"], outs["unfused"]),
        "ort_opt_err": normwise_rel_err(outs["ort-opt"], outs["unfused"]),
    }
    print(
        f"  {model.kind} {batch}x{seq}: unfused {row['unfused_ms']:.2f} ms, fused {row['fused_ms']:.2f} ms, "
        f"ort-opt {row['ort-opt_ms']:.2f} ms",
        flush=True,
    )
    return row


def bench_model(kind: str, shapes: list[tuple[int, int]], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    model = prepare(kind, args, work)
    print_placement(model, args.provider)
    providers = providers_for(args.provider)
    sessions = {v: ort_session(model.paths[v] / "model.onnx", providers, threads=args.threads) for v in VARIANTS}
    rows = [bench_shape(model, sessions, batch, seq, args) for batch, seq in shapes]
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    device = ort.get_device() if args.provider == "cuda" else "CPU"
    print(
        f"\nONNX Runtime {ort.__version__} ({args.provider}, {device}), {args.dtype}, median of {args.runs} runs "
        f"after {args.warmup} warm-up; ratios > 1: llm2trt's fused graph is faster"
    )
    header = (
        "model",
        "batch x seq",
        "unfused ms",
        "fused ms",
        "ort-opt ms",
        "unfused/fused",
        "ort-opt/fused",
        "fused err",
        "ort-opt err",
    )
    table = [header] + [
        (
            r["model"],
            f"{r['batch']}x{r['seq']}",
            f"{r['unfused_ms']:.2f}",
            f"{r['fused_ms']:.2f}",
            f"{r['ort-opt_ms']:.2f}",
            f"{r['unfused/fused']:.2f}",
            f"{r['ort-opt/fused']:.2f}",
            f"{r['fused_err']:.1e}",
            f"{r['ort_opt_err']:.1e}",
        )
        for r in rows
    ]
    print_columns(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shapes = [(int(b), int(s)) for b, s in (shape.split("x") for shape in args.shapes.split(","))]
    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu")

    rows: list[dict[str, Any]] = []
    with work_dir(args.work) as work:
        for kind in args.models.split(","):
            rows += bench_model(kind, shapes, args, work)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
