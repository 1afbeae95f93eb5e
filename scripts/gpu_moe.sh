#!/usr/bin/env bash
# The MoE kernel's check (scripts/check_moe_kernel.py) in one GPU lease, one stage per `run` call,
# sent back to back (the machine goes back ~30 s after a call). Each call carries git-ignored
# folders of parts; every stage first copies what it carries to /tmp/parts.
#
#   early        carry .p1 (small wheels: onnx-graphsurgeon, polygraphy, coloredlogs, humanfriendly)
#                and the first onnxruntime-gpu part: install the wheels, lay out this tree as the
#                `llm2trt` package (a copy of the tree that travelled), and build
#                the CUDA op library in the background
#   copy         only carry a part
#   check [SECS] the last part is here: install onnxruntime-gpu 1.31.1, wait for the library, run the
#                check (at most SECS, default 420); its log and JSON come back in $OUT
#   bench [SECS] likewise, then scripts/bench_decode.py --model qwen3-moe-2b (its checkpoint and
#                llm2trt's artifact are made in the background from `early` on)
#   both [CHECK_SECS] [BENCH_SECS]
#                the check without its decode rows (at most CHECK_SECS, default 240), then the bench
#                (at most BENCH_SECS, default 300): one call, inside its 600 s limit
#
# Parts: scripts/gpu_parts.sh's (.p1 holds the small wheels; ort.part0 .. ort.part4 are in .p6 .. .p10
# when it also split the GGUF). Five calls, ~4 minutes of device time in all on an H100:
#   early (carry .p1 .p6), copy (.p7), copy (.p8), copy (.p9), check, bench or both (.p10)
set -uo pipefail
stage=${1:-copy}
. "$(dirname "$0")/gpu_common.sh"
gather_parts
export PYTHONUNBUFFERED=1
O=/tmp/out
VIEW=/tmp/view

case "$stage" in
copy)
    ls /tmp/parts | tr '\n' ' '
    ;;
early)
    card_and_wheels
    # The package's layout (pyproject's package-dir): llm2trt/ with exporters, passes, plugins inside;
    # copied, so the build in the background reads a snapshot of the tree that travelled.
    package_view "$VIEW"
    # In a session of its own (it outlives this call), run from /tmp: from here `python3 -c` would
    # import this tree's llm2trt/ (the current directory comes first on sys.path), which lacks passes/.
    setsid nohup bash -c "cd /tmp; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 -c 'from llm2trt.plugins import ort_library as k; print(k.library(\"sm_90\"))'
        echo \"library build: rc \$? \$((SECONDS - s)) s\"; touch $O/build.done" >"$O/build.log" 2>&1 </dev/null &
    # The MoE shape's random checkpoint and llm2trt's fp16 gqa artifact (CPU work, no onnxruntime-gpu);
    # MOE_PREP=0 skips them (a check-only lease: the build then has the cores to itself).
    mkdir -p /tmp/w && cp -r scripts /tmp/scripts-copy
    [ "${MOE_PREP:-1}" = 1 ] && setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small TQDM_DISABLE=1; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model qwen3-moe-2b --work /tmp/w/bench --prepare-only --no-check
        echo \"prepare: rc \$? \$((SECONDS - s)) s\"; touch $O/prep.done" >"$O/prep.log" 2>&1 </dev/null &
    sleep 2
    ;;
check | bench | both)
    ort_site
    export PYTHONPATH=$VIEW:/tmp/site:/tmp/site-small
    cuda_libs
    t=0
    while [ ! -f "$O/build.done" ] && [ "$t" -lt 240 ]; do sleep 2; t=$((t + 2)); done
    cat "$O/build.log"
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    if [ "$stage" = check ]; then
        timeout "${2:-420}" python3 scripts/check_moe_kernel.py --json "$OUT/moe.json" ${3:-} 2>&1 |
            grep -v -i "warn" | tee "$OUT/moe.log"
    fi
    if [ "$stage" = both ]; then
        s=$SECONDS
        timeout "${2:-240}" python3 scripts/check_moe_kernel.py --skip-decode --json "$OUT/moe.json" 2>&1 |
            grep -v -i "warn" | tee "$OUT/moe.log"
        echo "check: $((SECONDS - s)) s"
    fi
    if [ "$stage" != check ]; then
        [ "$stage" = both ] && set -- "$stage" "${3:-300}"
        t=0
        while [ ! -f "$O/prep.done" ] && [ "$t" -lt 400 ]; do sleep 5; t=$((t + 5)); done
        tail -5 "$O/prep.log"
        cd /tmp/scripts-copy || exit 1
        timeout "${2:-420}" python3 bench_decode.py --model qwen3-moe-2b --work /tmp/w/bench \
            --runners llm2trt,hf-graph,hf-eager --profile --json "$OUT/bench-moe.json" 2>&1 |
            grep -v -i "warn" | tee "$OUT/bench-moe.log"
    fi
    ;;
esac
exit 0
