#!/usr/bin/env bash
# mypy over the package as it installs: exporters/, passes/ and plugins/ live at the repository
# root but import as llm2trt.exporters, ... (package-dir in pyproject.toml), a mapping mypy cannot
# follow in the source tree. A throwaway install into .mypy_view gives it the real layout.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .mypy_view
python -m pip install -q --no-deps --no-build-isolation --no-compile --target .mypy_view .
mypy .mypy_view/llm2trt
