#!/usr/bin/env bash
# On a GPU (inside scripts/gpu_decode.sh, after a bench_decode.py run left the 1.1B artifact
# in /tmp/bench): the decode attention kernel's split heuristic, swept. Each variant of the library
# is built with -D knobs (plugins/csrc/llm2trt_attention.cuh: LLM2TRT_DECODE_SMS_PER_BLOCK,
# LLM2TRT_DECODE_MAX_CLUSTER) and run as bench_decode.py's llm2trt row via $LLM2TRT_ORT_KERNELS;
# one line a variant (bs1 ms/step, % of floor, -, bs16 tok/s, prefill ms).
#
#   bash scripts/gpu_decode.sh bash scripts/sweep_decode_attention.sh "-DLLM2TRT_DECODE_MAX_CLUSTER=2" ...
set -euo pipefail
R=$(pwd)
# From /tmp: the checkout's llm2trt/ (without plugins/ inside) must not shadow the installed package.
lib() ( cd /tmp && python3 -c "import sys; from llm2trt.plugins.ort_library import library as l, device_arch as a; print(l(a(), tuple(sys.argv[1:])))" "$@" )
for defines in "" "$@"; do
    read -r -a flags <<< "$defines"
    lib "${flags[@]}" > /dev/null &  # the builds in parallel (one lock per variant)
done
wait
for defines in "" "$@"; do
    read -r -a flags <<< "$defines"
    path=$(lib "${flags[@]}")
    row=$(cd /tmp && LLM2TRT_ORT_KERNELS=$path python3 "$R/scripts/bench_decode.py" --model 1.1b --work /tmp/bench \
        --runners llm2trt 2>/dev/null | grep '^llm2trt ')
    echo "${defines:-default}: $row"
done
