"""Gemma 3 greedy tokens: transformers fp32 on the CPU (the reference, made where the GGUF is) against
llm2trt's fp16 `--kv-form gqa` artifacts on ONNX Runtime CUDA (made on the GPU machine).

    # here, on the CPU: the reference (5 prompts, each alone, 32 new tokens, top-two margins)
    python scripts/gemma3_tokens.py reference --gguf gemma-3-270m-q4_k_m.gguf --json out/gpu-24/gemma3-ref.json
    python scripts/gemma3_tokens.py reference --tiny --json out/gpu-24/tiny-gemma3-ref.json
    # there: compare an artifact's CUDA decode with it
    python scripts/gemma3_tokens.py compare --ref gemma3-ref.json --artifacts A [A ...] --json out.json

The 270M's prompts are tests/data/gemma3_prompts.txt, tokenized twice: with the tokenizer's BOS (how
Gemma is meant to be prompted) and without (what `llm2trt generate --prompt` feeds: it adds no special
tokens). The tiny model (`tiny:gemma3`, random weights, a 6-token window on its sliding layer) gets five
random-id prompts of 5-20 tokens and 40 new tokens, so its window decides the output. Greedy by a plain
loop over transformers' own cache (no generation config in the way); the reference keeps all new
tokens, the comparison cuts both rows after the artifact's first EOS id.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import TEST_DATA, divergence

NEW = 32
TINY_NEW = 40
PROMPTS_FILE = TEST_DATA / "gemma3_prompts.txt"
FALLBACK_PROMPTS = [
    "The capital of France is",
    "The best way to learn a new language is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]


def gemma3_prompts() -> list[str]:
    return PROMPTS_FILE.read_text().splitlines() if PROMPTS_FILE.is_file() else FALLBACK_PROMPTS


def greedy(model: Any, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """New ids and, at each step, the margin between the top two logits (float32)."""
    import torch

    ids, margins, past = torch.tensor([prompt]), [], None
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(new):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            token = int(torch.argmax(logits))
            tokens.append(token)
            ids = torch.tensor([[token]])
    return tokens, margins


def reference(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(2)
    start = time.perf_counter()
    sets: dict[str, list[list[int]]] = {}
    if args.tiny:
        from llm2trt.convert.sources import resolve_model
        from llm2trt.core.dtypes import DType

        model = resolve_model("tiny:gemma3").load(DType.FP32).eval()
        rng = np.random.default_rng(7)
        sets["tiny"] = [rng.integers(3, 1000, size=n).tolist() for n in (5, 11, 3, 8, 20)]
        new, texts = TINY_NEW, None
    else:
        gguf = args.gguf.resolve()
        kwargs = {"gguf_file": gguf.name}
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        model.eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        texts = gemma3_prompts()
        sets["bos"] = [list(tokenizer(p, add_special_tokens=True).input_ids) for p in texts]
        sets["nobos"] = [list(tokenizer(p, add_special_tokens=False).input_ids) for p in texts]
        new = NEW
    print(f"loaded in {time.perf_counter() - start:.0f} s; config: {type(model.config).__name__}", flush=True)
    eos = model.config.eos_token_id
    report: dict[str, Any] = {
        "model": "tiny:gemma3" if args.tiny else args.gguf.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": new,
        "hf_eos": eos if isinstance(eos, list) else [eos],
        "prompts": texts,
        "sets": {},
    }
    for name, prompts in sets.items():
        rows = []
        for prompt in prompts:
            tokens, margins = greedy(model, prompt, new)
            rows.append({"ids": prompt, "tokens": tokens, "margins": margins})
            print(f"[{name}] {len(prompt)} ids -> {tokens[:8]}... min margin {min(margins):.3f}", flush=True)
        report["sets"][name] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json} ({time.perf_counter() - start:.0f} s)")
    return 0


def compare(args: argparse.Namespace) -> int:
    from llm2trt.core.manifest import Manifest
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate

    ref = json.loads(args.ref.read_text())
    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    report: dict[str, Any] = {}
    for artifact in args.artifacts:
        manifest = Manifest.read(artifact)
        eos = set(manifest.generation.eos_token_ids) if manifest.generation else set()
        for name, rows in ref["sets"].items():
            results = []
            for i, row in enumerate(rows):
                start = time.perf_counter()
                got = generate(artifact, ids=[row["ids"]], sampling=Sampling(ref["new_tokens"]), providers=providers)
                new = got.rows[0].new_ids
                want = row["tokens"]
                want = want[: next((k + 1 for k, t in enumerate(want) if t in eos), len(want))]
                at = divergence(new, want)
                margin = row["margins"][at] if at is not None and at < len(row["margins"]) else None
                text = got.rows[0].text
                results.append(
                    {
                        "prompt": (ref["prompts"] or [None] * len(rows))[i],
                        "identical": at is None,
                        "diverges_at": at,
                        "fp32_top2_margin_there": margin,
                        "min_fp32_margin": min(row["margins"][: len(want)]),
                        "got": new,
                        "want": want,
                        "text": text,
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                )
                print(
                    f"{artifact.name} [{name}] {i}: identical={at is None} diverges_at={at} margin_there="
                    f"{'-' if margin is None else f'{margin:.4f}'} ({len(new)} new) {text!r:.80}",
                    flush=True,
                )
            same = sum(r["identical"] for r in results)
            print(f"{artifact.name} [{name}]: {same}/{len(results)} identical to transformers fp32 (each alone)")
            report[f"{artifact.name} {name} ({args.provider})"] = results
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def window_variant(artifact: Path, out: Path, window: int) -> Path:
    """A copy of `artifact` whose sliding layers' GroupQueryAttention take local_window_size=`window`."""
    import shutil

    import onnx

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(artifact, out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "GroupQueryAttention" and attr.name == "local_window_size" and attr.i > 0:
                attr.i = window
    onnx.save(proto, str(out / "model.onnx"))
    return out


def window_logits(args: argparse.Namespace) -> int:
    """Teacher-forced logits of the tiny model's CUDA artifact against transformers fp32, with the
    sliding layers' local_window_size at W (as written) and at W - 1, W + 1 and global: the variant
    whose logits are closest is the window the CUDA kernel applies as transformers does."""
    import numpy as np
    import torch
    from common import cuda_decoder_session, decoder_session

    from llm2trt.convert.sources import resolve_model
    from llm2trt.core.dtypes import DType

    ref = json.loads(args.ref.read_text())
    model = resolve_model("tiny:gemma3").load(DType.FP32).eval()
    window = int(model.config.sliding_window)
    rows = ref["sets"]["tiny"]
    wants = []
    for row in rows:
        seq = row["ids"] + row["tokens"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].float().numpy()
        wants.append(logits[len(row["ids"]) - 1 : len(seq) - 1])
    report: dict[str, Any] = {"window": window}
    for name, lws in (("W", window), ("W-1", window - 1), ("W+1", window + 1), ("global", -1)):
        artifact = window_variant(args.artifact, args.work / f"window-{name}", lws)
        if args.provider == "cuda":
            session = cuda_decoder_session(artifact, 128)
        else:
            session = decoder_session(artifact, 128, ["CPUExecutionProvider"])
        worst, picks_same = 0.0, 0
        for row, want in zip(rows, wants, strict=True):
            got = [session.prefill([row["ids"]])[0]]
            for token in row["tokens"][:-1]:
                got.append(session.decode(np.array([token]))[0])
            have = np.stack(got)
            worst = max(worst, float(np.abs(have - want).max() / np.abs(want).max()))
            picks_same += int((have.argmax(-1) == want.argmax(-1)).sum())
        steps = sum(len(w) for w in wants)
        report[name] = {"local_window_size": lws, "max_rel_logit_error": worst, "same_argmax": f"{picks_same}/{steps}"}
        print(
            f"tiny gemma3 {args.provider}, local_window_size {lws} ({name}): max relative logit error {worst:.2e}, "
            f"greedy pick equal to fp32 at {picks_same}/{steps} teacher-forced steps",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("--gguf", type=Path)
    ref.add_argument("--tiny", action="store_true")
    ref.add_argument("--json", type=Path, required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--ref", type=Path, required=True)
    cmp.add_argument("--artifacts", type=Path, nargs="+", required=True)
    cmp.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    cmp.add_argument("--json", type=Path)
    win = sub.add_parser("window")
    win.add_argument("--ref", type=Path, required=True, help="the tiny reference (reference --tiny)")
    win.add_argument("--artifact", type=Path, required=True, help="tiny:gemma3 fp16 --kv-form gqa")
    win.add_argument("--work", type=Path, default=Path("/tmp/gemma3-window"))
    win.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    win.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "window":
        return window_logits(args)
    if args.command == "reference":
        if not args.tiny and args.gguf is None:
            parser.error("reference: --gguf or --tiny")
        return reference(args)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
