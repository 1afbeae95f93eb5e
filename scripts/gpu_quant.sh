#!/usr/bin/env bash
# Quantized decode on one GPU lease (issue 26's speed lines), one stage per `run` call, sent back to
# back (the machine goes back ~30 s after a call). Each call carries git-ignored folders of parts;
# every stage first copies what it carries to /tmp/parts.
#
#   early        carry .p1 (small wheels: onnxruntime-genai-cuda, onnx-graphsurgeon, polygraphy, ...):
#                install them, lay out this tree as the `llm2trt` package, and start in the background:
#                the CUDA op library's build (sm_90), the NBits kernels' own check (no onnxruntime
#                needed: scripts/check_nbits_kernel.py --quick), the 1.1B shape's random checkpoint with
#                llm2trt's fp16, int4 and int8 artifacts, onnxruntime-genai's fp16 and int4 builds, and
#                (unless KV=0) the qwen3-1b artifacts kvbench times
#   copy         only carry a part (.p2 .. .p5: onnxruntime-gpu, split)
#   bench [SECS] carry the last part (.p6): install onnxruntime-gpu 1.31.1, wait for the preparation,
#                run the NBits ops through ONNX Runtime (scripts/check_ort_kernels.py) and
#                scripts/bench_decode.py --model 1.1b over llm2trt fp16/int4/int8 and genai fp16/int4
#                (at most SECS, default 540); logs and JSON come back in $OUT
#   kvbench [SECS]  the INT8 KV cache: the qwen3-1b graphs with it against their bodies, then decode
#                from 3,968 tokens of context: fp16 and int4 weights, each with the fp16 and INT8 cache
#
# Parts (made where pip works): .p1 the small wheels; .p2 .. .p6 the onnxruntime-gpu wheel split in
# 52 MB pieces (`split -b 52M -d -a 1`). Seven calls: early (.p1), copy x4 (.p2 .. .p5), bench (.p6),
# kvbench.
set -uo pipefail
stage=${1:-copy}
. "$(dirname "$0")/gpu_common.sh"
gather_parts
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
O=/tmp/out
VIEW=/tmp/view
RUNNERS=llm2trt,llm2trt-int4,llm2trt-int8,genai-int4-graph,genai-int4,genai-graph
KV_RUNNERS=llm2trt,llm2trt-kv8,llm2trt-int4,llm2trt-int4-kv8

pack() {
    [ -n "${OUT:-}" ] || return 0
    cp "$O"/*.log "$O"/*.txt "$O"/*.json "$OUT/" 2>/dev/null
    return 0
}

case "$stage" in
copy)
    ls /tmp/parts | tr '\n' ' '
    ;;
early)
    card_and_wheels
    package_view "$VIEW"
    # The scripts run from a copy (the tree is replaced call by call); their ROOT is then /tmp, where
    # check_nbits_kernel.py finds plugins/ort_library.py.
    mkdir -p /tmp/w && rm -rf /tmp/scripts-copy /tmp/plugins && cp -r scripts /tmp/scripts-copy && cp -r plugins /tmp/plugins
    # From /tmp: a `python3` started here would import this tree's llm2trt/ (no passes/ inside).
    setsid nohup bash -c "cd /tmp; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 -c 'from llm2trt.plugins import ort_library as k; print(k.library(\"sm_90\"))'
        echo \"library build: rc \$? \$((SECONDS - s)) s\"; touch $O/build.done
        [ -f /tmp/scripts-copy/check_nbits_kernel.py ] && timeout 240 python3 /tmp/scripts-copy/check_nbits_kernel.py --quick
        echo \"nbits check: rc \$?\"" >"$O/nbits.log" 2>&1 </dev/null &
    setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model 1.1b --work /tmp/w/bench --prepare-only --no-check \
            --runners llm2trt,llm2trt-int4,llm2trt-int8
        echo \"prepare llm2trt: rc \$? \$((SECONDS - s)) s\"; touch $O/prep.done" >"$O/prep.log" 2>&1 </dev/null &
    [ "${KV:-1}" = 1 ] && setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model qwen3-1b --work /tmp/w/bench --prepare-only --no-check \
            --runners $KV_RUNNERS
        echo \"prepare qwen3: rc \$? \$((SECONDS - s)) s\"; touch $O/kv.done" >"$O/kv.log" 2>&1 </dev/null &
    setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; sleep 20; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model 1.1b --work /tmp/w/bench --prepare-only --no-check \
            --runners genai-graph,genai-int4
        echo \"prepare genai: rc \$? \$((SECONDS - s)) s\"; touch $O/genai.done" >"$O/genai.log" 2>&1 </dev/null &
    sleep 2
    ;;
bench)
    ort_site
    export PYTHONPATH=$VIEW:/tmp/site:/tmp/site-small
    cuda_libs
    budget=${2:-540}
    t=0
    while { [ ! -f "$O/prep.done" ] || [ ! -f "$O/genai.done" ] || [ ! -f "$O/build.done" ]; } && [ "$t" -lt 300 ]; do
        sleep 5; t=$((t + 5))
    done
    echo "waited $t s for the preparation"
    tail -3 "$O/prep.log" "$O/genai.log" "$O/nbits.log"
    cd /tmp || exit 1
    # The ops alone, then the int4 and int8 graphs whole: with the library against their bodies.
    timeout 60 python3 /tmp/scripts-copy/check_ort_kernels.py --ops 2>&1 | grep -v -i warn | tee "$O/ort_ops.log" | tail -40
    timeout 60 python3 /tmp/scripts-copy/check_ort_kernels.py --artifacts /tmp/w/bench/llm2trt-*-gqa-int[48] 2>&1 |
        grep -v -i warn | tee "$O/ort_graphs.log" | tail -20
    cd /tmp/scripts-copy || exit 1
    timeout "$((budget - t - 120))" python3 bench_decode.py --model 1.1b --work /tmp/w/bench --runners "$RUNNERS" \
        --json "$O/bench-quant.json" 2>&1 | grep -v -i "warn" | tee "$O/bench-quant.log"
    ;;
kvbench)
    export PYTHONPATH=$VIEW:/tmp/site:/tmp/site-small
    cuda_libs
    t=0
    while [ ! -f "$O/kv.done" ] && [ "$t" -lt 200 ]; do sleep 5; t=$((t + 5)); done
    tail -3 "$O/kv.log"
    cd /tmp || exit 1
    timeout 60 python3 /tmp/scripts-copy/check_ort_kernels.py --artifacts /tmp/w/bench/llm2trt-*-gqa-kv8 \
        /tmp/w/bench/llm2trt-*-gqa-int4-kv8 2>&1 | grep -v -i warn | tee "$O/ort_kv8.log" | tail -20
    cd /tmp/scripts-copy || exit 1
    # Decode from 3,968 tokens of context to 4,096 (the shape's position limit): the cache is read whole each step.
    timeout "${2:-420}" python3 bench_decode.py --model qwen3-1b --work /tmp/w/bench --runners "$KV_RUNNERS" \
        --context 3968 --json "$O/bench-kv.json" 2>&1 | grep -v -i "warn" | tee "$O/bench-kv.log"
    ;;
esac
pack
exit 0
