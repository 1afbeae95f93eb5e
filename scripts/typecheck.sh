#!/usr/bin/env bash
# mypy over the package as it installs: exporters/, passes/ and plugins/ live at the repository
# root but import as llm2trt.exporters, ... (package-dir in pyproject.toml), a mapping mypy cannot
# follow in the source tree. A throwaway install into .mypy_view gives it the real layout.
set -euo pipefail
cd "$(dirname "$0")/.."
# Full TensorRT's API (plugins, timing cache, refit) is checked against tensorrt-stubs, kept out of
# the venv: its stub-only `tensorrt/` directory would import as an empty namespace package there.
STUBS=tensorrt-stubs==10.13.0.35.1
if [ ! -f .mypy_stubs/.version ] || [ "$(cat .mypy_stubs/.version)" != "$STUBS" ]; then
    rm -rf .mypy_stubs
    # pip's own notes (index locations it skips) are not the type check's output: shown only on failure.
    log=$(mktemp)
    python -m pip install -q --no-deps --no-compile --target .mypy_stubs "$STUBS" >"$log" 2>&1 \
        || { cat "$log" >&2; rm -f "$log"; exit 1; }
    rm -f "$log"
    # Defects of these generated stubs: plugin methods name a parameter `in` (a keyword),
    # add_scale_nd has a required parameter after defaults, the module's `bool` (a DataType)
    # shadows the builtin in every `-> bool`, and the package imports tensorrt_libs (no stubs).
    sed -i -E -e 's/([(,] *)in: /\1in_: /g' -e 's/, channel_axis: int\)/, channel_axis: int = ...)/' \
        -e 's/-> bool:/-> builtins.bool:/g' -e 's/: bool([,)=])/: builtins.bool\1/g' -e '1i import builtins' \
        .mypy_stubs/tensorrt_bindings/tensorrt.pyi
    sed -i -e '/^import tensorrt_libs/d' .mypy_stubs/tensorrt/__init__.pyi .mypy_stubs/tensorrt_bindings/__init__.pyi
    echo "$STUBS" > .mypy_stubs/.version
fi
rm -rf .mypy_view
python -m pip install -q --no-deps --no-build-isolation --no-compile --target .mypy_view .
MYPYPATH=.mypy_stubs mypy .mypy_view/llm2trt
