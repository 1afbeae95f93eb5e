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
