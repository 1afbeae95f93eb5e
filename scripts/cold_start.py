"""Time to the first token of a cold start: `llm2trt generate` (the whole command, one new token)
and `llm2trt serve` (process start -> listening, and -> the first token of one request sent then),
each run --runs times in a row (the OS file cache warm after the first).

    python scripts/cold_start.py ARTIFACT [--provider cpu|cuda] [--runs 3] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import ServerProcess


def cold_generate(artifact: Path, provider: str, prompt: str) -> float:
    command = [sys.executable, "-m", "llm2trt", "generate", str(artifact), "--prompt", prompt]
    start = time.perf_counter()
    subprocess.run([*command, "--max-new-tokens", "1", "--provider", provider, "-q"], check=True, capture_output=True)
    return time.perf_counter() - start


def cold_serve(artifact: Path, provider: str, prompt: str) -> tuple[float, float]:
    start = time.perf_counter()
    server = ServerProcess(artifact, ["--provider", provider])
    try:
        ready = time.perf_counter() - start
        body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
        headers = {"content-type": "application/json"}
        request = urllib.request.Request(f"{server.url}/v1/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
        return ready, time.perf_counter() - start
    finally:
        server.stop(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()
    if not (args.artifact / "manifest.json").is_file():
        parser.error(f"{args.artifact} is not an artifact (no manifest.json)")
    print("run  generate s  serve listening s  serve first token s")
    for run in range(args.runs):
        generate = cold_generate(args.artifact, args.provider, args.prompt)
        ready, first = cold_serve(args.artifact, args.provider, args.prompt)
        print(f"{run + 1:<4} {generate:<11.2f} {ready:<18.2f} {first:.2f}")


if __name__ == "__main__":
    main()
