#!/usr/bin/env bash
# On a GPU machine with no package index to install from: join the carried archive (its parts
# copied to /tmp by the calls before this one: `cp .pN/* /tmp/`), install its wheels (onnxruntime-gpu,
# onnxruntime-genai-cuda, polygraphy, onnx-graphsurgeon, gguf, ...) into /tmp/site and this
# checkout's package into /tmp/pkg once, then run the command given, e.g.
#
#   bash scripts/gpu_decode.sh python3 scripts/bench_decode.py --model 1.1b --work /tmp/bench
#
# Beforehand, where pip works: pip download those wheels (cp312, manylinux) with the GGUF beside
# them, tar, `split -b 58M`, one part per git-ignored folder .p1 ... .pN.
set -euo pipefail
cp .p*/* /tmp/ 2>/dev/null || true
if [ ! -f /tmp/site/.ready ]; then
    cat /tmp/gpu.tar.part* > /tmp/gpu.tar
    mkdir -p /tmp/wheels /tmp/site /tmp/pkg
    tar xf /tmp/gpu.tar -C /tmp/wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
    touch /tmp/site/.ready
fi
# The package as it installs (exporters/, passes/, plugins/ inside llm2trt/), without a build step.
rm -rf /tmp/pkg/llm2trt && cp -r llm2trt /tmp/pkg/ && cp -r exporters passes plugins /tmp/pkg/llm2trt/
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# onnxruntime-gpu and onnxruntime-genai find CUDA, cuBLAS and cuDNN in torch's nvidia wheels.
NVLIBS=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))')
export LD_LIBRARY_PATH=${NVLIBS}:${LD_LIBRARY_PATH:-}
"$@"
