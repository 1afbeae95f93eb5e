#!/usr/bin/env bash
# The test job: set up, then lint (ruff), type-check (mypy) and run the test suite (pytest).
# Extra arguments go to pytest, e.g. scripts/test.sh -k build.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
./scripts/typecheck.sh
echo "== pytest"
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup --durations=15 "$@"
