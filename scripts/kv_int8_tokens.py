"""SmolLM2-135M's greedy tokens with an INT8 KV cache against the float cache, on the five prompts
of tests/data/smollm2_prompts.txt (one batch, 32 new tokens each), in ONNX Runtime.

    python scripts/kv_int8_tokens.py --artifact SMOLLM2_ARTIFACT --work /tmp/kv8 [--provider cuda]

Makes `optimize --kv-form gqa` and `optimize --kv-form gqa --kv-dtype int8` of the artifact (scales
calibrated on the built-in text) and prints, per prompt, how many leading tokens agree and both
continuations. On the CPU ONNX Runtime runs the ops' reference bodies; with --provider cuda,
llm2trt's CUDA kernels (the library is built and registered by the CUDA session).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_prompts.txt"
NEW = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="SmolLM2's converted artifact (fp32 or fp16)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kv8"))
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    from llm2trt.core.sampling import Sampling
    from llm2trt.generate.driver import generate

    forms = {"float cache": [], "int8 cache": ["--kv-dtype", "int8"]}
    made = {}
    for name, extra in forms.items():
        out = args.work / name.replace(" ", "-")
        if not (out / "manifest.json").is_file():
            command = [sys.executable, "-m", "llm2trt", "optimize", str(args.artifact), "-o", str(out)]
            subprocess.run([*command, "--kv-form", "gqa", *extra, "-q", "--force"], check=True)
        made[name] = out
    prompts = PROMPTS.read_text().splitlines()
    providers = ["CUDAExecutionProvider"] if args.provider == "cuda" else None
    rows = {
        name: generate(out, prompts=prompts, sampling=Sampling(NEW), providers=providers).rows
        for name, out in made.items()
    }
    same_total = 0
    for i, prompt in enumerate(prompts):
        a, b = rows["float cache"][i].new_ids, rows["int8 cache"][i].new_ids
        same = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same_total += same == len(a) == len(b)
        print(f"{prompt!r}: {same}/{len(a)} tokens agree")
        print(f"   float: {rows['float cache'][i].text!r}")
        print(f"   int8:  {rows['int8 cache'][i].text!r}")
    print(f"identical continuations: {same_total} of {len(prompts)} ({args.provider})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
