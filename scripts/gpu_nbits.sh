#!/usr/bin/env bash
# The NBits kernels' check (scripts/check_nbits_kernel.py --quick) on one GPU lease, over libraries
# built beforehand where nvcc runs (so the lease is not spent compiling): each carried xz-compressed
# as out/nb/NAME.so.xz (git-ignored: name out/nb in the call's carry), unpacked there; the first is
# the library checked and timed, the others are timed against it (--compare).
#
#   scripts/gpu_nbits.sh build NAME [-DNAME=VALUE ...]   here (venv active): out/nb/NAME.so.xz, sm_90
#   scripts/gpu_nbits.sh MAIN [OTHER ...]                on the GPU; extra check flags in NBITS_FLAGS
#
# The log comes back as $OUT/nbits.log.
set -uo pipefail
if [ "${1:-}" = build ]; then
    shift
    mkdir -p out/nb
    python3 - "$@" <<'PY' || exit 1
import importlib.util, lzma, pathlib, sys

import llm2trt

root = pathlib.Path.cwd()
if str(root) not in llm2trt.__path__:  # passes/ imports as llm2trt.passes from a checkout
    llm2trt.__path__.append(str(root))
spec = importlib.util.spec_from_file_location("ort_library", root / "plugins" / "ort_library.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
name, defines = sys.argv[1], tuple(sys.argv[2:])
built = module.library("sm_90", defines)
(root / "out" / "nb" / f"{name}.so.xz").write_bytes(lzma.compress(built.read_bytes()))
print(f"out/nb/{name}.so.xz from {built}")
PY
    exit 0
fi
main=$1
shift
mkdir -p /tmp/nblib
for name in "$main" "$@"; do
    python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
        "out/nb/$name.so.xz" "/tmp/nblib/$name.so" || exit 1
done
compare=()
for name in "$@"; do compare+=(--compare "/tmp/nblib/$name.so"); done
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
# shellcheck disable=SC2086  # NBITS_FLAGS is a list of flags
PYTHONUNBUFFERED=1 python3 scripts/check_nbits_kernel.py --quick --library "/tmp/nblib/$main.so" "${compare[@]}" \
    ${NBITS_FLAGS:-} 2>&1 | tee "${OUT:-/tmp}/nbits.log"
