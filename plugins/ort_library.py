"""llm2trt's CUDA kernels for ONNX Runtime: the custom-op library behind the `llm2trt` ops that
`--kv-form gqa` graphs carry (passes/ort_ops.py), built from `csrc/` on first use.

ONNX Runtime loads it with `SessionOptions.register_custom_ops_library`; without it the same graph
runs the ops' reference bodies. The library is compiled by nvcc (CUDA 12 or 13: `$CUDA_HOME`,
`PATH`, or the `nvidia-cuda-nvcc` wheel that `llm2trt[gpu]` installs) for one GPU architecture,
once per source, compiler and architecture, into llm2trt's cache (`$LLM2TRT_CACHE`, else
`~/.cache/llm2trt`). `$LLM2TRT_ORT_KERNELS` names a prebuilt library to use instead.
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
from pathlib import Path

from llm2trt.core.errors import BackendError

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "csrc"
SOURCE = SOURCES / "llm2trt_ort.cu"
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
    digest = hashlib.sha256()
    for source in sorted(SOURCES.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(_version(compiler).encode() + arch.encode() + " ".join(defines).encode())
    target = cache_dir() / digest.hexdigest()[:16] / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key across processes
        if not target.is_file():
            _build(compiler, arch, target, defines)
    return target


def _build(compiler: Path, arch: str, target: Path, defines: tuple[str, ...]) -> None:
    number = arch.removeprefix("sm_")
    root = compiler.parent.parent
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / LIBRARY_NAME
        command = [
            str(compiler),
            f"-gencode=arch=compute_{number},code=sm_{number}",
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            "-cudart=static",
            f"-L{root / 'lib'}",  # the wheel's layout (lib, not lib64)
            *defines,
            str(SOURCE),
            "-o",
            str(out),
        ]
        log.info("building llm2trt's CUDA kernels for %s with %s", arch, compiler)
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"building llm2trt's CUDA kernels failed: {exc}") from None
        if run.returncode != 0:
            lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
            raise BackendError(f"building llm2trt's CUDA kernels failed: {lines[0] if lines else run.returncode}")
        os.replace(out, target)  # atomic: another process never sees half a library


def graph_uses(onnx_path: str | Path) -> bool:
    """Whether the graph has nodes of this library's ops."""
    import onnx

    from llm2trt.passes.ort_ops import ALL_OPS, DOMAIN  # here: scripts load this module on its own

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.domain == DOMAIN and node.op_type in ALL_OPS for node in model.graph.node)


def device_arch() -> str:
    """sm_XY of CUDA device 0 (torch's view)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"
