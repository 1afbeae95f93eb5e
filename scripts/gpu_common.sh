# Sourced by the GPU lease scripts (gpu_session.sh, gpu_moe.sh, gpu_quant.sh), run from the tree's root
# on the GPU machine: what their stages share.
#   gather_parts      copy what this call carried (git-ignored .p1, .p2, ...) into /tmp/parts
#   card_and_wheels   record the card in $O/card.txt; install the small wheels into /tmp/site-small
#   package_view DIR  lay this tree out as the installed `llm2trt` package (pyproject's package-dir:
#                     exporters, passes, plugins inside), a snapshot background jobs read
O=/tmp/out

gather_parts() {
    mkdir -p /tmp/parts "$O"
    for d in .p[0-9]*; do [ -d "$d" ] && cp -r "$d"/. /tmp/parts/; done
    return 0
}

card_and_wheels() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/card.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-small /tmp/parts/*.whl
}

package_view() {
    rm -rf "$1" && mkdir -p "$1" && cp -r llm2trt "$1/llm2trt"
    for d in exporters passes plugins; do cp -r "$d" "$1/llm2trt/$d"; done
}

#   ort_site          onnxruntime-gpu from its carried parts (ort.part*) into /tmp/site, once a machine
ort_site() {
    [ -f /tmp/site/.ready ] && return 0
    mkdir -p /tmp/wheels /tmp/site
    cat /tmp/parts/ort.part* >/tmp/wheels/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl &&
        touch /tmp/site/.ready
}

#   cuda_libs         the CUDA libraries torch's nvidia wheels carry, on LD_LIBRARY_PATH (after PYTHONPATH is set)
cuda_libs() {
    local libs
    libs=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))')
    export LD_LIBRARY_PATH=${libs}:${LD_LIBRARY_PATH:-}
}
