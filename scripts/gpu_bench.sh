#!/usr/bin/env bash
# On a GPU machine with no package index: install the carried wheels, then run the fusion
# benchmark and the fused-op probe on ONNX Runtime's CUDA provider. Results go to $OUT.
#
# Beforehand, where pip works: download onnxruntime-gpu (cp312, CUDA 13), polygraphy, onnx-graphsurgeon,
# coloredlogs, humanfriendly and an llm2trt wheel, tar them, split into 60 MB parts in the
# git-ignored folders .p1 ... .p5 (one part each); send .p1-.p4 with `cp .pN/* /tmp/` commands
# back to back, then this script with .p5.
set -euo pipefail
OUT=${OUT:-/tmp/out}
cp .p5/* /tmp/ 2>/dev/null || true
cat /tmp/gpu.tar.part* > /tmp/gpu.tar
mkdir -p /tmp/wheels /tmp/site
tar xf /tmp/gpu.tar -C /tmp/wheels
cp .p5/*.whl /tmp/wheels/ 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import onnxruntime as o, torch, transformers; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 scripts/bench_fusions.py --provider cuda --dtype fp16 --runs 50 --warmup 10 --json "$OUT/bench_cuda_fp16.json" 2>&1 | tee "$OUT/bench_cuda_fp16.txt"
python3 scripts/probe_fused_ops.py --providers cuda 2>&1 | tee "$OUT/probe_cuda.txt"
python3 scripts/bench_fusions.py --provider cuda --dtype fp32 --runs 50 --warmup 10 --json "$OUT/bench_cuda_fp32.json" 2>&1 | tee "$OUT/bench_cuda_fp32.txt"
