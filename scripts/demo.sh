#!/usr/bin/env bash
# The main job: set up, then convert -> optimize -> build (TensorRT-RTX, sm89) -> compare for every
# built-in tiny model. Artifacts land in out/demo/<model>/{onnx,opt,engine}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/demo}
MODELS=${MODELS:-"tiny:gpt2 tiny:llama tiny:bert tiny:vit"}
CC=${CC:-sm89}
summary=()
for model in $MODELS; do
    name=${model#tiny:}
    dir="$OUT/$name"
    echo "== $model"
    llm2trt convert "$model" -o "$dir/onnx" --force
    llm2trt optimize "$dir/onnx" -o "$dir/opt" --force
    llm2trt build "$dir/opt" -o "$dir/engine" --compute-capability "$CC" --force
    llm2trt compare "$dir/opt" --json -q > "$dir/compare.json" || { cat "$dir/compare.json"; exit 1; }
    summary+=("$(python - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
c = json.load(open(f"{d}/compare.json")); b = json.load(open(f"{d}/engine/build.json"))
print(f"{d.split('/')[-1]:<6} {c['main_output']:<18} {c['main_max_rel_err']:.2e}  "
      f"{'PASS' if c['passed'] else 'FAIL'}  {b['backend']} {b['compute_capability']} "
      f"{b['network_layers']} layers {b['engine_bytes'] / 1e6:.1f} MB")
PY
)")
done
echo
echo "model  main output        rel err   verdict  engine"
printf '%s\n' "${summary[@]}"
