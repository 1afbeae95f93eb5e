"""Greedy tokens of llm2trt's fp16 artifacts on ONNX Runtime CUDA against transformers in fp32.

    python scripts/gpu_tokens.py --hf /tmp/bench/hf-smollm2 --artifacts A [A ...]

For five prompts, 32 greedy tokens each: identical or not, and where a row diverges, the step and
the fp32 reference's margin between its top two logits there (a near-tie that fp16 rounding flips
is not a graph error). `--hf-fp16`: transformers itself in fp16 against its fp32, the same count
(how many of these prompts fp16 arithmetic keeps at all), once as it is (fp16 logits) and once with
its lm_head in float32 over the same fp16 weights (float32 logits, as llm2trt's gqa graph gives).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from common import SMOL_NEW_TOKENS, divergence, eos_ids, smollm2_prompts

SMOL_PROMPTS = smollm2_prompts()


class _FloatHead(torch.nn.Module):
    """lm_head over the model's own (fp16) weight, accumulated and returned in float32."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.head.weight.float())


def reference(
    hf_dir: Path, ids: list[list[int]], dtype: torch.dtype = torch.float32, float_logits: bool = False
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens per prompt (alone, unpadded) and the top-2 logit margin at each step."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).cuda().eval()
    if float_logits:
        model.lm_head = _FloatHead(model.lm_head)
    tokens, margins = [], []
    for prompt in ids:
        out = model.generate(
            input_ids=torch.tensor([prompt], device="cuda"),
            max_new_tokens=SMOL_NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.eos_token_id,
        )
        new = out.sequences[0, len(prompt) :].tolist()
        top2 = [torch.topk(score[0].float(), 2).values.tolist() for score in out.scores]
        tokens.append(new)
        margins.append([a - b for a, b in top2])
    return tokens, margins


def compare(
    artifact: Path, ref: list[list[int]], margins: list[list[float]], alone: bool = False
) -> list[dict[str, object]]:
    from llm2trt.core.manifest import Manifest
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate

    def run(prompts: list[str]) -> Any:
        return generate(
            artifact, prompts=prompts, sampling=Sampling(SMOL_NEW_TOKENS), providers=["CUDAExecutionProvider"]
        )

    # One batch of five (left padding, many-row kernels) or each prompt alone (batch 1: one-row kernels).
    results = [run([p]) for p in SMOL_PROMPTS] if alone else [run(SMOL_PROMPTS)]
    got_rows = [row for result in results for row in result.rows]
    eos = eos_ids(Manifest.read(artifact))
    rows = []
    for i, (row, full) in enumerate(zip(got_rows, ref, strict=True)):
        want = full[: next((k + 1 for k, t in enumerate(full) if t in eos), len(full))]
        diverge = divergence(row.new_ids, want)
        margin = margins[i][diverge] if diverge is not None and diverge < len(margins[i]) else None
        rows.append(
            {
                "prompt": SMOL_PROMPTS[i],
                "identical": diverge is None,
                "diverges_at": diverge,
                "fp32_top2_margin_there": margin,
                "text": row.text,
            }
        )
        print(f"{artifact.name}: [{i}] identical={diverge is None} diverges_at={diverge} margin={margin}")
    same = sum(bool(r["identical"]) for r in rows)
    how = "each prompt alone" if alone else "one batch of five"
    print(f"{artifact.name}: {same}/{len(rows)} prompts identical to transformers fp32 ({how})")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, nargs="+", required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hf-fp16", action="store_true", help="also transformers fp16 against its fp32")
    args = parser.parse_args()
    from llm2trt.convert.tokenizer import load_tokenizer
    from llm2trt.core.manifest import Manifest

    first = args.artifacts[0]
    tokenizer = load_tokenizer(first, Manifest.read(first))
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in SMOL_PROMPTS]
    ref, margins = reference(args.hf, ids)
    for float_logits in (False, True) if args.hf_fp16 else ():
        half, _ = reference(args.hf, ids, torch.float16, float_logits)
        name = "transformers fp16" + (", float32 logits" if float_logits else "")
        for i, (got, want) in enumerate(zip(half, ref, strict=True)):
            at = divergence(got, want)
            print(f"{name}: [{i}] identical={at is None} diverges_at={at}")
        same = sum(got == want for got, want in zip(half, ref, strict=True))
        print(f"{name}: {same}/{len(ref)} prompts identical to transformers fp32 (each prompt alone)")
    report = {
        f"{artifact.name} ({'alone' if alone else 'batch'})": compare(artifact, ref, margins, alone)
        for artifact in args.artifacts
        for alone in (False, True)
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
