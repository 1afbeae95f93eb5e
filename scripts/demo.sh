#!/usr/bin/env bash
# The main job: set up, then for every built-in tiny model convert -> optimize (fusions) -> build
# (TensorRT-RTX, sm89; the unfused graph too, to compare layer counts) -> compare against PyTorch.
# Artifacts land in out/demo/<model>/{onnx,opt,engine,engine-unfused}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/demo}
MODELS=${MODELS:-"tiny:gpt2 tiny:llama tiny:bert tiny:vit"}
CC=${CC:-sm89}
for model in $MODELS; do
    dir="$OUT/${model#tiny:}"
    echo "== $model"
    llm2trt convert "$model" -o "$dir/onnx" --force
    llm2trt optimize "$dir/onnx" -o "$dir/opt" --force
    llm2trt build "$dir/opt" -o "$dir/engine" --compute-capability "$CC" --force
    llm2trt build "$dir/onnx" -o "$dir/engine-unfused" --compute-capability "$CC" --force -q > /dev/null
    llm2trt compare "$dir/opt" --json -q > "$dir/compare.json" || { cat "$dir/compare.json"; exit 1; }
done
echo
python - "$OUT" $MODELS <<'PY'
import json, sys
out, models = sys.argv[1], sys.argv[2:]
print(f"{'model':<6} {'main output':<18} {'rel err':<9} {'verdict':<8} {'fusions (found/expected)':<42} "
      f"{'optimize check':<15} TensorRT-RTX layers fused/unfused")
for model in models:
    d = f"{out}/{model.split(':')[1]}"
    c = json.load(open(f"{d}/compare.json"))
    r = json.load(open(f"{d}/opt/report.json"))
    fused, plain = (json.load(open(f"{d}/{e}/build.json")) for e in ("engine", "engine-unfused"))
    fusions = ", ".join(f"{k} {r['fusions'][k]}/{v}" for k, v in r["expected"].items())
    check = max(r["numeric_check"]["max_rel_err"].values())
    print(f"{model.split(':')[1]:<6} {c['main_output']:<18} {c['main_max_rel_err']:.2e}  "
          f"{'PASS' if c['passed'] else 'FAIL':<8} {fusions:<42} {check:.2e}       "
          f"{fused['network_layers']}/{plain['network_layers']} ({fused['compute_capability']}, "
          f"{fused['engine_bytes'] / 1e6:.1f} MB)")
PY
