"""llm2trt's CUDA kernels (plugins/csrc) against their reference bodies, on the GPU, one table.

    python scripts/check_ort_kernels.py --artifacts A [A ...]
    python scripts/check_ort_kernels.py --ops [--cpu]

For each `--kv-form gqa` artifact: two ONNX Runtime CUDA sessions over the same graph, one with
llm2trt's kernel library registered (built here on first use), one running the ops' reference
bodies. Same inputs: a prefill of two rows of 9 tokens (the many-row path: cuBLAS), then a
one-token decode step at batch 1 (the one-row kernels) and at batch 2. Reports the largest logit
difference relative to the largest logit, and each path's time per run (no CUDA graph, so launch
counts show too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import artifact_graph


def session(model: str | bytes, library: str | None, provider: str = "CUDAExecutionProvider") -> Any:
    """An ONNX Runtime session over `model`, with llm2trt's library registered unless None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model, options, providers=[provider])


def sessions(onnx_path: str) -> tuple[Any, Any]:
    from llm2trt.plugins import ort_library as ort_kernels

    library = str(ort_kernels.library(ort_kernels.device_arch()))
    print(f"library: {library}")
    return session(onnx_path, library), session(onnx_path, None)


def feeds_for(session: Any, batch: int, seq: int, past: int, capacity: int, rng: Any) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for tensor in session.get_inputs():
        name = tensor.name
        if name == "input_ids":
            feeds[name] = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)
        elif name == "seqlens_k":
            feeds[name] = np.full(batch, past + seq - 1, np.int32)
        elif name == "total_sequence_length":
            feeds[name] = np.array(past + seq, np.int32)
        else:  # a cache buffer: random past entries
            shape = [batch if d == "batch" else capacity if not isinstance(d, int) else d for d in tensor.shape]
            dtype = np.float16 if "float16" in tensor.type else np.float32
            feeds[name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
    return feeds


def timed(session: Any, feeds: dict[str, np.ndarray], runs: int = 20) -> tuple[list[np.ndarray], float]:
    out = session.run(None, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    return out, (time.perf_counter() - start) / runs * 1e3


def check(artifact: Path) -> list[str]:
    """A prefill from an empty cache, then a decode step on the cache that prefill wrote."""
    _manifest, _graph, onnx_path = artifact_graph(artifact)
    kernels, bodies = sessions(str(onnx_path))
    rng = np.random.default_rng(0)
    rows = []
    caches: dict[int, dict[str, np.ndarray]] = {}
    for label, batch, seq, past in (("prefill 2x9", 2, 9, 0), ("decode bs1", 1, 1, 9), ("decode bs2", 2, 1, 9)):
        feeds = feeds_for(kernels, batch, seq, past, 64, rng)
        if past == 0:
            for name in [n for n in feeds if n.startswith("past_key_values.")]:
                feeds[name] = np.zeros_like(feeds[name])
            names = [o.name for o in bodies.get_outputs()]
            outs = dict(zip(names, bodies.run(None, feeds), strict=True))
            cache = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
            caches = {1: {n: v[:1].copy() for n, v in cache.items()}, 2: cache}
        else:
            feeds.update(caches[batch])
        got, ms_k = timed(kernels, feeds)
        want, ms_b = timed(bodies, feeds)
        scale = float(np.abs(want[0].astype(np.float32)).max())
        err = float(np.abs(got[0].astype(np.float32) - want[0].astype(np.float32)).max()) / scale
        same = float((got[0].argmax(-1) == want[0].argmax(-1)).mean())
        rows.append(f"{artifact.name:<34} {label:<12} {err:>10.2e} {same:>9.0%} {ms_k:>10.3f} {ms_b:>10.3f}")
    return rows


def op_rows(dtype: Any) -> list[str]:
    """Each op alone on CUDA (one row: the GEMV kernels; three rows: cuBLAS) against float64."""
    from llm2trt.passes.ort_ops import OPS, one_op_model, reference, sample_values
    from llm2trt.plugins import ort_library as ort_kernels

    library = str(ort_kernels.library(ort_kernels.device_arch()))
    rows = []
    for name in OPS:
        for rows_m, k, n in ((1, 2048, 2560), (1, 576, 960), (1, 100, 36), (3, 2048, 512)):
            n_w = 2 * n if name.endswith("SwiGLU") else n
            feeds = sample_values(name, rows_m, k, n, dtype, seed=1)
            model = one_op_model(name, feeds).SerializeToString()
            got = session(model, library).run(["Y"], feeds)[0].astype(np.float64)
            want = reference(name, feeds)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            rows.append(f"{name:<20} {np.dtype(dtype).name:<8} M={rows_m} K={k:<5} N={n_w:<5} {err:>10.2e}")
    return rows


ATTENTION_CASES = (  # label, row lengths after the call, new tokens, total_sequence_length, (H, KVH, D, slots), window
    ("decode, 1.1B heads", [100], 1, 128, (32, 4, 64, 128), -1),
    ("decode, SmolLM2 bs2", [37, 90], 1, 128, (9, 3, 64, 128), -1),
    ("decode, head 128 bs3", [5, 64, 150], 1, 160, (16, 4, 128, 160), -1),
    ("decode, 40 slots", [3, 40], 1, 40, (8, 2, 64, 40), -1),
    ("prefill, padded rows", [20, 13], 20, 20, (32, 4, 64, 64), -1),
    ("prefill after a past", [50], 10, 50, (9, 3, 64, 64), -1),
    # local_window_size (Gemma 3's sliding layers: 4 / 1 heads of 256): a query sees its W latest keys
    ("decode, window 16", [100], 1, 128, (32, 4, 64, 128), 16),
    ("decode, window 16, h256 bs2", [9, 100], 1, 128, (4, 1, 256, 128), 16),
    ("prefill, window 6, padded", [20, 13], 20, 20, (4, 1, 256, 64), 6),
    ("prefill after past, win 8", [50], 10, 50, (9, 3, 64, 64), 8),
)
# GroupQueryAttentionQKNorm (Qwen3 16 / 8 heads of 128, Gemma 3 4 / 1 of 256 with its window).
QK_NORM_CASES = (
    ("qk-norm decode, h128", [100], 1, 128, (16, 8, 128, 128), -1),
    ("qk-norm decode, h256 win 16", [9, 100], 1, 128, (4, 1, 256, 128), 16),
    ("qk-norm prefill, h128 padded", [20, 13], 20, 20, (16, 8, 128, 64), -1),
    ("qk-norm prefill, h256 win 6", [50], 10, 50, (4, 1, 256, 64), 6),
)


def _attention_error(
    got: list[np.ndarray], exact: np.ndarray, keys: np.ndarray, lengths: list[int], seq: int, total: int
) -> float:
    """The largest relative error of the real tokens' outputs and of each row's key cache."""
    errs = []
    for b, length in enumerate(lengths):
        valid = min(seq, length) if seq == total else seq
        scale = np.abs(exact[b, :valid]).max()
        errs.append(float(np.abs(got[0][b, :valid].astype(np.float64) - exact[b, :valid]).max() / scale))
        key_err = np.abs(got[1][b, :, :length].astype(np.float64) - keys[b, :, :length]).max()
        errs.append(float(key_err / np.abs(keys[b, :, :length]).max()))
    return max(errs)


def attention_rows(dtype: Any, provider: str) -> list[str]:
    """llm2trt's GroupQueryAttention alone against float64: the output of every real token and the
    key cache up to each row's length (the library's decode kernel at one new token, else its
    prefill path); and the same model without the library, i.e. its body, ONNX Runtime's own
    GroupQueryAttention, where that provider runs it."""
    from llm2trt.passes.ort_ops import attention_model, attention_reference, attention_values
    from llm2trt.plugins import ort_library as ort_kernels

    arch = ort_kernels.device_arch() if provider == "CUDAExecutionProvider" else "sm_80"
    library = str(ort_kernels.library(arch))
    rows = []
    cases = [(case, False) for case in ATTENTION_CASES] + [(case, True) for case in QK_NORM_CASES]
    for (label, lengths, seq, total, shape, window), qk_norm in cases:
        heads, kv_heads, head, capacity = shape
        feeds = attention_values(lengths, seq, total, shape, dtype, seed=2, qk_norm=qk_norm)
        attrs = {"local_window_size": window}
        model = attention_model(heads, kv_heads, head, capacity, dtype, attrs, qk_norm=qk_norm).SerializeToString()
        exact, keys = attention_reference(feeds, heads, kv_heads, window)

        case = (exact, keys, lengths, seq, total)
        ours = _attention_error(session(model, library, provider).run(None, feeds), *case)
        try:
            body = f"{_attention_error(session(model, None, provider).run(None, feeds), *case):.2e}"
        except Exception as exc:  # ONNX Runtime's op may refuse a type on a provider
            body = f"body failed: {str(exc).splitlines()[0][:60]}"
        rows.append(f"{'GroupQueryAttention':<20} {np.dtype(dtype).name:<8} {label:<28} {ours:>10.2e}  body {body}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, nargs="*", default=[])
    parser.add_argument("--ops", action="store_true", help="each op alone against float64")
    parser.add_argument("--cpu", action="store_true", help="--ops: the attention op's CPU registration instead")
    args = parser.parse_args()
    lines = []
    if args.ops:
        lines += [f"{'op':<20} {'dtype':<8} shape {'':<20} rel. err vs float64"]
        if not args.cpu:
            lines += op_rows(np.float16) + op_rows(np.float32)
        provider = "CPUExecutionProvider" if args.cpu else "CUDAExecutionProvider"
        lines += attention_rows(np.float16, provider) + attention_rows(np.float32, provider)
    if args.artifacts:
        lines += [f"{'artifact':<34} {'run':<12} {'rel. err':>10} {'argmax =':>9} {'kernels ms':>10} {'bodies ms':>10}"]
    for artifact in args.artifacts:
        lines += check(artifact)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
