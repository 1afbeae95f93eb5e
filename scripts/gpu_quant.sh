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
#                PREP names the llm2trt runners prepared (default llm2trt,llm2trt-int4,llm2trt-int8; none:
#                no graphs, for `kernels`), or
#                QUANTS="int4 int8" makes only those graphs, side by side after one convert (for `graphs`);
#                GENAI=0 skips onnxruntime-genai's builds (no genai wheel needed). Where the call also
#                carries out/newsrc (kernel sources to try, e.g. a changed qgemv.cu; they replace
#                plugins/csrc's files) or sets NEW_DEFINES, a copy of the tree, /tmp/newtree, builds its
#                libraries in the background (scripts/gpu_nbits.sh build): `new` with NEW_DEFINES, and
#                each `NAME:-DDEFINE[,-DDEFINE ...]` of NEW_VARIANTS (space-separated); NBITS_EARLY_FLAGS
#                adds flags to the NBits check
#                (e.g. --skip-speed where `kernels` times the committed library beside the new one)
#   copy         only carry a part (.p2 .. .p5: onnxruntime-gpu, split)
#   bench [SECS] carry the last part (.p6): install onnxruntime-gpu 1.31.1, wait for the preparation,
#                run the NBits ops through ONNX Runtime (scripts/check_ort_kernels.py) and
#                scripts/bench_decode.py --model 1.1b over llm2trt fp16/int4/int8 and genai fp16/int4
#                (at most SECS, default 540); logs and JSON come back in $OUT
#   graphs [SECS] carry the last part: install onnxruntime-gpu, wait for the NBits check, then only the
#                int4 and int8 graphs whole, the library against the bodies (check_ort_kernels.py
#                --artifacts; at most SECS in all, default 560); with /tmp/newtree's libraries built,
#                scripts/gpu_nbits.sh checks `new` and times it against the committed library (the one
#                `early` built) and the variants, while the preparation runs or after the graphs
#   kernels [SECS] no part needed (PREP=none in `early`: no graphs): wait for the NBits check, then
#                /tmp/newtree's libraries checked and timed against it, as `graphs` does
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

left() { echo $((budget - SECONDS - $1 > 10 ? budget - SECONDS - $1 : 10)); }  # seconds, less a reserve
graphs() {  # the int4 and int8 graphs, the committed library against the bodies
    while [ ! -f "$O/prep.done" ] && [ "$SECONDS" -lt $((budget - 150)) ]; do sleep 5; done
    echo "waited until $SECONDS s for the preparation"
    tail -3 "$O/prep.log"
    (cd /tmp && timeout "$(left "${1:-0}")" python3 /tmp/scripts-copy/check_ort_kernels.py \
        --artifacts /tmp/w/bench/llm2trt-*-gqa-int[48] 2>&1 | grep -v -i warn | tee "$O/ort_graphs.log"
        echo "ort graphs: rc ${PIPESTATUS[0]} at $SECONDS s")
}
newlib() {  # the tried sources' library checked and timed against the committed one
    [ -d /tmp/newtree ] || return 0
    while [ ! -f "$O/newlib.done" ] && [ "$SECONDS" -lt $((budget - ${1:-0} - 60)) ]; do sleep 5; done
    cat "$O/newlib.log"
    [ -f "$O/newlib.done" ] && [ -f /tmp/newtree/out/nb/new.so.xz ] || return 0
    committed=$(cd /tmp && python3 -c 'from llm2trt.plugins import ort_library as k; print(k.library("sm_90"))')
    python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.compress(open(sys.argv[1], "rb").read(), preset=1))' \
        "$committed" /tmp/newtree/out/nb/committed.so.xz
    others=$(cd /tmp/newtree/out/nb && ls -- *.so.xz | sed 's/\.so\.xz$//' | grep -v -x -e new -e committed | tr '\n' ' ')
    # shellcheck disable=SC2086  # the variants' names
    (cd /tmp/newtree && OUT=$O/new NBITS_FLAGS="--skip-many-rows --out $O/nbits-new-accuracy.txt" \
        timeout "$(left "${1:-0}")" bash scripts/gpu_nbits.sh new committed $others)
    cp "$O/new/nbits.log" "$O/nbits-new.log" 2>/dev/null
}

# The card, then the NBits check `early` started (until second $1 at most), then a folder for new libraries.
await_nbits() {
    cat "$O/card.txt"
    while [ ! -f "$O/nbits.done" ] && [ "$SECONDS" -lt "$1" ]; do sleep 5; done
    echo "waited until $SECONDS s for the NBits check"
    cat "$O/nbits.log"
    mkdir -p "$O/new"
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
        [ -f /tmp/scripts-copy/check_nbits_kernel.py ] && timeout 240 python3 /tmp/scripts-copy/check_nbits_kernel.py --quick \
            --out $O/nbits-accuracy.txt ${NBITS_EARLY_FLAGS:-}
        echo \"nbits check: rc \$? \$((SECONDS - s)) s\"; touch $O/nbits.done" >"$O/nbits.log" 2>&1 </dev/null &
    if [ "${PREP:-}" = none ]; then
        touch "$O/prep.done"
    elif [ -n "${QUANTS:-}" ]; then
        # Only the quantized graphs (no bench after): --prepare-only always makes the fp16 gqa graph
        # too, so a placeholder manifest stands in for it; the first runner's job makes the checkpoint
        # and converts it, the others wait for that and then optimize beside it.
        mkdir -p /tmp/w/bench/llm2trt-hf-1.1b-gqa && echo '{}' >/tmp/w/bench/llm2trt-hf-1.1b-gqa/manifest.json
        i=0
        for q in ${QUANTS}; do
            setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
                [ $i = 0 ] || while [ ! -f /tmp/w/bench/llm2trt-hf-1.1b/manifest.json ]; do sleep 2; done
                python3 /tmp/scripts-copy/bench_decode.py --model 1.1b --work /tmp/w/bench --prepare-only --no-check \
                    --runners llm2trt-$q
                echo \"prepare llm2trt-$q: rc \$? \$((SECONDS - s)) s\"; touch $O/prep-$q.done" >"$O/prep-$q.out" 2>&1 </dev/null &
            i=$((i + 1))
        done
        setsid nohup bash -c "for q in ${QUANTS}; do while [ ! -f $O/prep-\$q.done ]; do sleep 2; done; done
            cat $O/prep-*.out >$O/prep.log; touch $O/prep.done" >/dev/null 2>&1 </dev/null &
    else
    setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model 1.1b --work /tmp/w/bench --prepare-only --no-check \
            --runners ${PREP:-llm2trt,llm2trt-int4,llm2trt-int8}
        echo \"prepare llm2trt: rc \$? \$((SECONDS - s)) s\"; touch $O/prep.done" >"$O/prep.log" 2>&1 </dev/null &
    fi
    [ "${KV:-1}" = 1 ] && setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; s=\$SECONDS
        python3 /tmp/scripts-copy/bench_decode.py --model qwen3-1b --work /tmp/w/bench --prepare-only --no-check \
            --runners $KV_RUNNERS
        echo \"prepare qwen3: rc \$? \$((SECONDS - s)) s\"; touch $O/kv.done" >"$O/kv.log" 2>&1 </dev/null &
    if compgen -G "out/newsrc/*" >/dev/null || [ -n "${NEW_DEFINES:-}" ]; then
        rm -rf /tmp/newtree && mkdir -p /tmp/newtree && cp -r llm2trt passes plugins scripts /tmp/newtree/
        compgen -G "out/newsrc/*" >/dev/null && cp out/newsrc/* /tmp/newtree/plugins/csrc/
        # NEW_VARIANTS: words NAME:-DDEFINE[,-DDEFINE ...]
        setsid nohup bash -c "cd /tmp/newtree; export PYTHONPATH=/tmp/newtree:/tmp/site-small; s=\$SECONDS
            bash scripts/gpu_nbits.sh build new ${NEW_DEFINES:-} &
            for v in ${NEW_VARIANTS:-}; do d=\${v#*:}; bash scripts/gpu_nbits.sh build \${v%%:*} \${d//,/ } & done
            wait; ls out/nb; echo \"new libraries: \$((SECONDS - s)) s\"; touch $O/newlib.done" \
            >"$O/newlib.log" 2>&1 </dev/null &
    fi
    [ "${GENAI:-1}" = 1 ] || touch "$O/genai.done"
    [ "${GENAI:-1}" = 1 ] && setsid nohup bash -c "cd /tmp/w; export PYTHONPATH=$VIEW:/tmp/site-small; sleep 20; s=\$SECONDS
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
    # Rows print as they are measured (the table used to print at the end only, and a 1.1B graph's two
    # sessions take a while); the exit status says whether the timeout stopped it.
    timeout 180 python3 /tmp/scripts-copy/check_ort_kernels.py --artifacts /tmp/w/bench/llm2trt-*-gqa-int[48] 2>&1 |
        grep -v -i warn | tee "$O/ort_graphs.log" | tail -20
    echo "ort graphs: rc ${PIPESTATUS[0]}"
    cd /tmp/scripts-copy || exit 1
    timeout "$((budget - SECONDS - 30))" python3 bench_decode.py --model 1.1b --work /tmp/w/bench --runners "$RUNNERS" \
        --json "$O/bench-quant.json" 2>&1 | grep -v -i "warn" | tee "$O/bench-quant.log"
    ;;
graphs)
    ort_site
    export PYTHONPATH=$VIEW:/tmp/site:/tmp/site-small
    cuda_libs
    budget=${2:-560}
    await_nbits $((budget - 200))
    if [ -f "$O/prep.done" ] || [ ! -d /tmp/newtree ]; then
        graphs 0; newlib 0
    else  # the kernels' timing while the graphs are still being made (GPU idle), 240 s kept for them
        newlib 240; graphs 0
    fi
    ;;
kernels)  # no onnxruntime: the NBits check `early` started, then /tmp/newtree's libraries against it
    export PYTHONPATH=$VIEW:/tmp/site-small
    budget=${2:-420}
    await_nbits $((budget - 120))
    newlib 0
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
