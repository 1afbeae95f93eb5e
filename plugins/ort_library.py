"""llm2trt's CUDA kernels for ONNX Runtime: the custom-op library behind the `llm2trt` ops that
`--kv-form gqa` graphs carry (passes/ort_ops.py), built from `csrc/` on first use.

The sources are compiled against `llm2trt_ops.h`, which this module writes at build time from the
op table (passes/ort_op_table.py): the ops' names, inputs, outputs, types and attributes, so the
C++ registration and the pass read one table.

ONNX Runtime loads it with `SessionOptions.register_custom_ops_library`; without it the same graph
runs the ops' reference bodies. The library is compiled by nvcc (CUDA 12 or 13: `$CUDA_HOME`,
`PATH`, or the `nvidia-cuda-nvcc` wheel that `llm2trt[gpu]` installs) for one GPU architecture,
once per source (the generated header included), compiler and architecture, into llm2trt's cache
(`$LLM2TRT_CACHE`, else `~/.cache/llm2trt`). `$LLM2TRT_ORT_KERNELS` names a prebuilt library to
use instead.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm2trt.core.errors import BackendError
from llm2trt.passes import ort_op_table as table

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "csrc"
# The translation units, by concern: ABI glue and registration, CPU reference, one-row GEMV kernels
# (float weights, and NBits: INT4 / INT8 codes), the many-row cuBLAS path, attention, routed experts
# (MoE). Named, not globbed: a stale file left in an install is no unit.
UNITS = ("ort_glue.cu", "cpu_reference.cu", "gemv.cu", "qgemv.cu", "cublas_paths.cu", "attention.cu", "moe.cu")
HEADER = "llm2trt_ops.h"  # generated from the op table; not in SOURCES
LIBRARY_NAME = "libllm2trt_ort.so"
ENV_LIBRARY = "LLM2TRT_ORT_KERNELS"


def nvcc() -> Path | None:
    """The CUDA compiler: $CUDA_HOME (or $CUDA_PATH), then PATH, then the nvidia-cuda-nvcc wheel."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("nvidia")
    bases = list(spec.submodule_search_locations or []) if spec is not None else []
    for base in bases:
        for major in ("cu13", "cu12"):
            candidate = Path(base) / major / "bin" / "nvcc"
            if candidate.is_file():
                return candidate
    return None


def cache_dir() -> Path:
    root = (
        os.environ.get("LLM2TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm2trt"
    )
    return Path(root) / "ort-kernels"


@functools.cache  # a session start asks again; the compiler at a path does not change
def _version(compiler: Path) -> str:
    try:
        out = subprocess.run([str(compiler), "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"{compiler} --version failed: {exc}") from None
    return out.stdout.strip().splitlines()[-1]


def library(arch: str, defines: tuple[str, ...] = ()) -> Path:
    """The library for GPU architecture `arch` (e.g. "sm_90"), built if this cache lacks it.
    `defines` (-DNAME=VALUE) build a tuning variant (scripts/bench_ort_kernels.py --variant)."""
    prebuilt = os.environ.get(ENV_LIBRARY)
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise BackendError(f"${ENV_LIBRARY} names {prebuilt}, which is not a file")
        return Path(prebuilt)
    compiler = nvcc()
    if compiler is None:
        raise BackendError("no nvcc to build llm2trt's CUDA kernels (install llm2trt[gpu] or set CUDA_HOME)")
    header = ops_header()
    target = cache_dir() / build_key(header, _version(compiler), arch, defines) / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key across processes
        if not target.is_file():
            _build(compiler, arch, target, defines, header)
    return target


def build_key(header: str, version: str, arch: str, defines: tuple[str, ...]) -> str:
    """The cache key: every file in csrc/, the generated header, the compiler, the arch, the defines."""
    digest = hashlib.sha256()
    for source in sorted(p for p in SOURCES.iterdir() if p.is_file()):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(HEADER.encode() + header.encode())
    digest.update(version.encode() + arch.encode() + " ".join(defines).encode())
    return digest.hexdigest()[:16]


def _build(compiler: Path, arch: str, target: Path, defines: tuple[str, ...], header: str) -> None:
    """Each unit compiled on its own (in parallel: a first use waits on the slowest unit, not the
    sum), then linked into one library."""
    number = arch.removeprefix("sm_")
    root = compiler.parent.parent
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        out = work / LIBRARY_NAME
        (work / HEADER).write_text(header)
        gencode = f"-gencode=arch=compute_{number},code=sm_{number}"  # the link's device stub too
        flags = [
            gencode,
            "-O3",
            "-std=c++17",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            f"-I{work}",
            *defines,
        ]
        objects = [work / Path(unit).with_suffix(".o").name for unit in UNITS]
        compiles = [
            [str(compiler), *flags, "-c", str(SOURCES / unit), "-o", str(obj)]
            for unit, obj in zip(UNITS, objects, strict=True)
        ]
        link = [
            str(compiler),
            gencode,
            "-shared",
            "-cudart=static",
            f"-L{root / 'lib'}",  # the wheel's layout (lib, not lib64)
            *(str(obj) for obj in objects),
            "-o",
            str(out),
        ]
        log.info("building llm2trt's CUDA kernels for %s with %s", arch, compiler)
        with ThreadPoolExecutor(max_workers=min(len(compiles), os.cpu_count() or 1)) as pool:
            failures = [failure for failure in pool.map(_compile, compiles) if failure]
        failure = failures[0] if failures else _compile(link)
        if failure:
            raise BackendError(f"building llm2trt's CUDA kernels failed: {failure}")
        os.replace(work / HEADER, target.parent / HEADER)  # beside the library, for reading
        os.replace(out, target)  # atomic: another process never sees half a library


def _compile(command: list[str]) -> str:
    """Run one nvcc command: '' when it succeeds, else the first line of what it said."""
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if run.returncode == 0:
        return ""
    lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
    return lines[0] if lines else f"exit status {run.returncode}"


def ops_header() -> str:
    """llm2trt_ops.h: the op table as the library's C++ reads it. Per op its name, counts, each input's
    and output's type ("T": the registration's element type), which inputs ONNX Runtime hands over
    in CPU memory, which outputs are optional, its attributes, the slot of each input and output
    name, the kernel family the names imply (a Gamma normalizes, a Skip adds, a GateUp output is
    SwiGLU, Scales make it an NBits op: quantized W), and whether it has a bfloat16 registration."""
    ops = table.ALL
    names = list(dict.fromkeys(n for op in ops for n in (*op.inputs, *op.outputs)))
    attrs = list(dict.fromkeys(a for op in ops for a in op.attributes))
    for name in (*names, *attrs):
        if not name.isidentifier() or name == "kCount":
            raise ValueError(f"op table: {name!r} cannot name a C++ constant")
    types = {"T": "kT", "I32": "kInt32", "I64": "kInt64", "F32": "kFloat32", "U8": "kUInt8", "I8": "kInt8"}
    most = {"inputs": max(len(op.inputs) for op in ops), "outputs": max(len(op.outputs) for op in ops)}
    most_attrs = max(1, *(len(op.attributes) for op in ops))

    def flags(values: list[bool]) -> str:
        return "{" + ", ".join("true" if v else "false" for v in values) + "}"

    def at(slots: tuple[str, ...]) -> str:
        return "{" + ", ".join(str(slots.index(n)) if n in slots else "-1" for n in names) + "}"

    rows = []
    for op in ops:
        family = {
            "norm": "Gamma" in op.inputs,
            "skip": "Skip" in op.inputs,
            "swiglu": "GateUp" in op.outputs,
            "attention": op in table.ATTENTIONS,
            "qk_norm": "QNorm" in op.inputs,
            "float_y": op.float_y,
            "moe": op is table.MOE,
            "nbits": "Scales" in op.inputs,
            "bfloat": op.bfloat16,  # (also registered for bfloat16 tensors)
        }
        fields = [
            f'"{op.name}", {len(op.inputs)}, {len(op.outputs)}, {len(op.attributes)}',
            "/* input_type */ {" + ", ".join(types[op.input_type(n)] for n in op.inputs) + "}",
            "/* input_on_host */ " + flags([n in op.host_inputs for n in op.inputs]),
            "/* output_type */ {" + ", ".join(types[op.output_type(n)] for n in op.outputs) + "}",
            "/* output_optional */ " + flags([n in op.optional_outputs for n in op.outputs]),
            "/* attribute */ {" + ", ".join(f"attr::{a}" for a in op.attributes) + "}",
            "/* input_at */ " + at(op.inputs),
            "/* output_at */ " + at(op.outputs),
            "/* " + ", ".join(family) + " */ " + ", ".join("true" if v else "false" for v in family.values()),
        ]
        signature = f"{op.name}({', '.join(op.inputs)}) -> ({', '.join(op.outputs)})"
        rows.append(f"    // {signature}\n    {{" + ",\n     ".join(fields) + "},")
    sizes = ", ".join(str(size) for size in table.ATTENTION_HEAD_SIZES)
    attr_types = ", ".join("kInt" if table.ATTRIBUTE_TYPES[a] is int else "kFloat" for a in attrs)
    return f"""// Generated from passes/ort_op_table.py by plugins/ort_library.py when the library is built:
// change the table, not this file.
#pragma once
#include <stddef.h>

#include <utility>

namespace llm2trt {{
namespace ops {{

inline constexpr char kDomain[] = "{table.DOMAIN}";

// Every input and output name in the table; Op::input_at / output_at give an op's slot (-1: none).
namespace io {{
enum : int {{ {", ".join(names)}, kCount }};
}}

// Every attribute name, with its type; a kernel keeps one value per name.
namespace attr {{
enum : int {{ {", ".join(attrs)}, kCount }};
}}
enum AttributeType : int {{ kFloat, kInt }};
inline constexpr const char* kAttributeName[attr::kCount] = {{{", ".join(f'"{a}"' for a in attrs)}}};
inline constexpr AttributeType kAttributeType[attr::kCount] = {{{attr_types}}};

// kT: the element type the op is registered for (float16 or float32, one registration each, and
// bfloat16 where the op's `bfloat16` is set); the others are fixed.
enum Type : int {{ kT, kInt32, kInt64, kFloat32, kUInt8, kInt8 }};

inline constexpr size_t kMaxInputs = {most["inputs"]}, kMaxOutputs = {most["outputs"]}, kMaxAttributes = {most_attrs};

struct Op {{
  const char* name;
  size_t inputs, outputs, attributes;  // counts
  Type input_type[kMaxInputs];
  bool input_on_host[kMaxInputs];
  Type output_type[kMaxOutputs];
  bool output_optional[kMaxOutputs];
  int attribute[kMaxAttributes];  // attr:: ids, in the op's order
  int input_at[io::kCount];
  int output_at[io::kCount];
  bool norm, skip, swiglu, attention, qk_norm, float_y, moe, nbits;  // the kernel family (nbits: quantized W)
  bool bfloat16;  // registered for bfloat16 too
}};

inline constexpr Op kOps[] = {{
{chr(10).join(rows)}
}};

// GroupQueryAttention's kernels: the head sizes instantiated and the most query heads a KV head.
using AttentionHeadSizes = std::integer_sequence<int, {sizes}>;
inline constexpr char kAttentionHeadSizesText[] = "{table.ATTENTION_HEAD_SIZES_TEXT}";
inline constexpr int kAttentionMaxGroup = {table.ATTENTION_MAX_GROUP};

}}  // namespace ops
}}  // namespace llm2trt
"""


def graph_uses(onnx_path: str | Path) -> bool:
    """Whether the graph has nodes of this library's ops."""
    import onnx

    names = {op.name for op in table.ALL}
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.domain == table.DOMAIN and node.op_type in names for node in model.graph.node)


def device_arch() -> str:
    """sm_XY of CUDA device 0 (torch's view)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"
