"""Which fp16 rounding flips SmolLM2's greedy tokens? transformers in fp32 on the CPU, with one kind
of value at a time rounded to fp16 (and back), against plain fp32 on the five prompts that
tests/test_generate.py and scripts/gpu_tokens.py use, 32 greedy tokens each.

    python scripts/fp16_roundings.py            # CPU only, a few minutes

What it settles (docs/kv-cache.md, "Greedy tokens"): why an fp16 graph that gives float32 logits
keeps more of fp32's tokens than transformers fp16, whose logits are fp16.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import SMOL_NEW_TOKENS, divergence, smollm2_gguf, smollm2_prompts


def greedy(model: Any, tokenizer: Any) -> list[list[int]]:
    rows = []
    for prompt in smollm2_prompts():
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(
            input_ids=ids, max_new_tokens=SMOL_NEW_TOKENS, do_sample=False, pad_token_id=model.config.eos_token_id
        )
        rows.append(out[0, ids.shape[1] :].tolist())
    return rows


def _round(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (output[0].half().float(), *output[1:])
    return output.half().float()


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import transformers

    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    reference = greedy(model, tokenizer)

    def norms() -> list[torch.nn.Module]:
        return [m for m in model.model.modules() if "norm" in type(m).__name__.lower()]

    def linears() -> list[torch.nn.Module]:
        return [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]

    trials: list[tuple[str, Callable[[], list[torch.nn.Module]]]] = [
        ("logits only", lambda: [model.lm_head]),
        ("each layer's output (the residual stream)", lambda: list(model.model.layers)),
        ("every projection's output but the logits", linears),
        ("every norm's output", norms),
        ("all of these but the logits", lambda: [*model.model.layers, *linears(), *norms()]),
    ]
    print(f"{'rounded to fp16':<44} identical  first divergence per prompt")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    rows = [("the weights (then kept for every row below)", greedy(model, tokenizer))]
    for name, modules in trials:
        hooks = [m.register_forward_hook(_round) for m in modules()]
        rows.append((name, greedy(model, tokenizer)))
        for hook in hooks:
            hook.remove()
    for name, got in rows:
        at = [divergence(g, r) for g, r in zip(got, reference, strict=True)]
        print(f"{name:<44} {sum(a is None for a in at)}/{len(at)}        {at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
