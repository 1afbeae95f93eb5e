#!/usr/bin/env bash
# Regenerate the goldens the test suite checks (tests/data/golden/*.npz): every tiny spec,
# converted fresh, every module output marked, ONNX Runtime's tensors saved. Run it only when a
# change is meant to move the numbers, and say why in the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p tests/data/golden
for name in gpt2 llama bert vit; do
    llm2trt convert "tiny:$name" -o "$work/$name" -q
    llm2trt compare "$work/$name" --mark all --batch 2 --sequence 6 --save-golden "tests/data/golden/$name.npz" -q
done
ls -l tests/data/golden
