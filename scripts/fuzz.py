"""The parser fuzz targets of tests/fuzz, run longer than CI runs them (docs/fuzzing.md).

    python scripts/fuzz.py --examples 5000              # each target, 5000 examples (derandomized)
    python scripts/fuzz.py --seconds 300 manifest gguf  # each named target for about 5 minutes, random seeds

Each target runs as `pytest tests/fuzz/test_TARGET.py -k test_fuzz_` in a process of its own (the
targets are tests; scripts never import the test suite): LLM2TRT_FUZZ_EXAMPLES sets the examples, and
with --seconds, batches run on fresh seeds (`--hypothesis-seed`) until the time is up. Prints a
table: target, executions (every call, shrinking included), inputs parsed, inputs refused with one
line, failures (each with the smallest input hypothesis found, printed above the table). Exits 1
when any target failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["manifest", "lora_adapter", "external_data", "safetensors", "gguf", "profiles", "prequant", "openai_request"]
BATCH = 1000  # examples per run on a fresh seed (--seconds)


def _batch(name: str, examples: int, work: Path, seed: int | None) -> tuple[Counter[str], list[str]]:
    """One pytest run of a target: its counts, and its failures (the error lines pytest printed)."""
    stats = work / f"{name}.stats.json"
    stats.unlink(missing_ok=True)
    env = {
        **os.environ,
        "LLM2TRT_FUZZ_EXAMPLES": str(examples),
        "LLM2TRT_FUZZ_STATS": str(stats),
        "LLM2TRT_FUZZ_WORK": str(work / name),
        "LLM2TRT_FUZZ_RANDOM": "1" if seed is not None else "0",
    }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/fuzz/test_{name}.py"]
    args += ["-k", "test_fuzz_", *([f"--hypothesis-seed={seed}"] if seed is not None else [])]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    counts: Counter[str] = Counter(json.loads(stats.read_text())) if stats.is_file() else Counter()
    failures = []
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        errors = [line[1:].strip() for line in proc.stdout.splitlines() if line.startswith("E ") and "Error" in line]
        failures = sorted(set(errors[:1] or [f"pytest exited {proc.returncode}"]))
    return counts, failures


def run(name: str, examples: int, seconds: float | None, work: Path) -> tuple[Counter[str], list[str]]:
    if seconds is None:
        return _batch(name, examples, work, None)
    counts: Counter[str] = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        more, found = _batch(name, BATCH, work, random.getrandbits(32))
        counts.update(more)
        failures += [f for f in found if f not in failures]
    return counts, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--examples", type=int, default=1000, help="examples per target (derandomized)")
    parser.add_argument("--seconds", type=float, help="run each target about this long instead, on random seeds")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a fresh temporary one)")
    args = parser.parse_args()
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="llm2trt-fuzz-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.targets or TARGETS:
        start = time.monotonic()
        counts, failures = run(name, args.examples, args.seconds, work)
        rows.append((name, counts, failures, time.monotonic() - start))
        print(f"{name}: {counts['examples']} executions, {len(failures)} failure(s)", file=sys.stderr)
    print("\n| target | executions | parsed | refused (one line) | failures | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, counts, failures, elapsed in rows:
        print(
            f"| {name} | {counts['examples']} | {counts['parsed']} | {counts['refused']} | {len(failures)} "
            f"| {elapsed:.0f} |"
        )
    for name, _, failures, _ in rows:
        for failure in failures:
            print(f"{name}: {failure}")
    return 1 if any(failures for _, _, failures, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
