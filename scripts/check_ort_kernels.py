"""llm2trt's CUDA kernels (plugins/csrc) against their reference bodies, on the GPU, one table.

    python scripts/check_ort_kernels.py --artifacts A [A ...]
    python scripts/check_ort_kernels.py --ops [--cpu]
    python scripts/check_ort_kernels.py --int8-cache [--cpu]

For each `--kv-form gqa` artifact: two ONNX Runtime CUDA sessions over the same graph, one with
llm2trt's kernel library registered (built here on first use), one running the ops' reference
bodies. Same inputs: a prefill of two rows of 9 tokens (the many-row path: cuBLAS), then a
one-token decode step at batch 1 (the one-row kernels) and at batch 2. Reports the largest logit
difference relative to the largest logit, and each path's time per run (no CUDA graph, so launch
counts show too).

`--ops` also runs the INT8-cache attention ops (GroupQueryAttention[QKNorm]Int8KV) beside their
fp16-cache twins on the same cache contents at 4,096 slots (`--int8-cache`: only those rows): the
error of each against float64 and the time per call, measured over a model of LAYERS such nodes
(each its own caches, bound on the device and updated in place) queued back to back.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from itertools import product
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

    start = time.perf_counter()
    library = str(ort_kernels.library(ort_kernels.device_arch()))
    note(f"library: {library} ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    kernels = session(onnx_path, library)
    note(f"{onnx_path}: session with the library in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    bodies = session(onnx_path, None)
    note(f"{onnx_path}: session of the bodies in {time.perf_counter() - start:.0f} s")
    return kernels, bodies


def note(line: str) -> None:
    """Progress on stderr, at once: a run stopped by a timeout still shows how far it came."""
    print(line, file=sys.stderr, flush=True)


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
            dtype = np.float16 if "float16" in tensor.type else np.int8 if "int8" in tensor.type else np.float32
            # An INT8 cache holds codes: spread them over the range as a calibrated cache would.
            spread = 40 if dtype == np.int8 else 0.5
            feeds[name] = (rng.standard_normal(shape) * spread).clip(-127, 127).astype(dtype)
    return feeds


def timed(
    session: Any, feeds: dict[str, np.ndarray], runs: int = 20, seconds: float = 1.0
) -> tuple[list[np.ndarray], float]:
    """The outputs of a first run, and ms per run over at most `runs` more (fewer where a run is
    slow, as a body that runs partly on the host is: about `seconds` in all, at least 2)."""
    start = time.perf_counter()
    out = session.run(None, feeds)
    first = time.perf_counter() - start
    runs = max(2, min(runs, int(seconds / max(first, 1e-6))))
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
        print(rows[-1], flush=True)  # as measured: the table is the rows printed so far
    return rows


def op_rows(dtype: Any) -> list[str]:
    """Each op alone on CUDA (one row: the GEMV kernels; three rows: cuBLAS) against float64."""
    from llm2trt.passes.ort_ops import OPS, one_op_model, reference, sample_values
    from llm2trt.plugins import ort_library as ort_kernels

    library = str(ort_kernels.library(ort_kernels.device_arch()))
    rows = []
    for name in OPS:
        # NBits ops: INT4 in blocks of 32 and 128, INT8 one block a row (a K the block does not
        # divide takes one block a row too: K 100 runs the generic kernel)
        formats = ((4, 32), (4, 128), (8, 0)) if "Scales" in OPS[name].inputs else ((0, 0),)
        for (rows_m, k, n), (bits, size) in product(
            ((1, 2048, 2560), (1, 576, 960), (1, 100, 36), (3, 2048, 512)), formats
        ):
            n_w = 2 * n if "SwiGLU" in name else n
            block = size if size and k % size == 0 else k
            feeds = sample_values(name, rows_m, k, n, dtype, seed=1, bits=bits or 4, block=block)
            model = one_op_model(name, feeds).SerializeToString()
            got = session(model, library).run(["Y"], feeds)[0].astype(np.float64)
            want = reference(name, feeds)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            quant = f" int{bits} b{block}" if bits else ""
            label = f"{name}{quant}"
            rows.append(f"{label:<36} {np.dtype(dtype).name:<8} M={rows_m} K={k:<5} N={n_w:<5} {err:>10.2e}")
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


# INT8-cache attention beside the fp16-cache op: label, row lengths after the call, new tokens,
# total_sequence_length, (H, KVH, D, slots), QK-norm. Llama-3-8B's heads (32 / 8 of 128), the 1.1B's
# (32 / 4 of 64), Qwen3's with QK-norm (16 / 8 of 128); a full 4,096-slot cache where it decodes.
INT8_CASES = (
    ("decode bs1, 4096 slots", [4096], 1, 4096, (32, 8, 128, 4096), False),
    ("decode bs2, 4096 slots", [4096, 3000], 1, 4096, (32, 8, 128, 4096), False),
    ("decode bs1, h64, 4096", [4096], 1, 4096, (32, 4, 64, 4096), False),
    ("decode bs2, qk-norm, 4096", [4096, 2048], 1, 4096, (16, 8, 128, 4096), True),
    ("prefill 2x512, padded", [512, 400], 512, 512, (32, 8, 128, 4096), False),
    ("prefill 128 after 1920", [2048], 128, 2048, (32, 8, 128, 4096), False),
    ("prefill 2x256, qk-norm", [256, 200], 256, 256, (16, 8, 128, 4096), True),
)
LAYERS = 16  # nodes a timed run holds: ONNX Runtime's per-run overhead spread over them


def layered(model: Any, layers: int) -> bytes:
    """`model`'s one attention node as `layers` nodes, each with caches of its own (PastKey.i ->
    PresentKey.i, ...), the other inputs shared; its bodies kept."""
    graph = model.graph
    [node] = graph.node
    own = {"PastKey", "PastValue", "Output", "PresentKey", "PresentValue"}
    nodes: list[Any] = []
    inputs: list[Any] = [i for i in graph.input if i.name not in own]
    outputs: list[Any] = []
    for layer in range(layers):
        made = copy.deepcopy(node)
        made.input[:] = [f"{n}.{layer}" if n in own else n for n in node.input]
        made.output[:] = [f"{n}.{layer}" for n in node.output]
        nodes.append(made)
        for source, target in ((graph.input, inputs), (graph.output, outputs)):
            for info in source:
                if info.name in own:
                    renamed = copy.deepcopy(info)
                    renamed.name = f"{info.name}.{layer}"
                    target.append(renamed)
    del graph.node[:], graph.input[:], graph.output[:]
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    return bytes(model.SerializeToString())


def layered_run(sess: Any, feeds: dict[str, np.ndarray], layers: int, device: str, runs: int) -> tuple[Any, float]:
    """Layer 0's (Output, PresentKey, PresentValue) from a first run, and µs per node over `runs`
    more queued back to back (the last one waited for). The caches are bound once on `device`, as
    both past and present (in place), total_sequence_length on the host (the op reads it there)."""
    import onnxruntime as ort

    binding = sess.io_binding()
    kept = []  # the OrtValues must outlive the runs
    order = []  # the outputs in the order bound (copy_outputs_to_cpu's)
    for name, value in feeds.items():
        if name in ("PastKey", "PastValue"):
            present = name.replace("Past", "Present")
            for layer in range(layers):
                cache = ort.OrtValue.ortvalue_from_numpy(value, device, 0)
                kept.append(cache)
                binding.bind_ortvalue_input(f"{name}.{layer}", cache)
                binding.bind_ortvalue_output(f"{present}.{layer}", cache)
                order.append(f"{present}.{layer}")
        else:
            where = "cpu" if name == "TotalSequenceLength" else device
            bound = ort.OrtValue.ortvalue_from_numpy(value, where, 0)
            kept.append(bound)
            binding.bind_ortvalue_input(name, bound)
    for layer in range(layers):
        binding.bind_output(f"Output.{layer}", device, 0)
        order.append(f"Output.{layer}")
    sess.run_with_iobinding(binding)
    outs = dict(zip(order, binding.copy_outputs_to_cpu(), strict=True))
    first = (outs["Output.0"], outs["PresentKey.0"], outs["PresentValue.0"])
    queued = ort.RunOptions()
    queued.add_run_config_entry("disable_synchronize_execution_providers", "1")
    sess.run_with_iobinding(binding)  # warm
    start = time.perf_counter()
    for _ in range(runs - 1):
        sess.run_with_iobinding(binding, queued)
    sess.run_with_iobinding(binding)  # waits for the device
    return first, (time.perf_counter() - start) / (runs * layers) * 1e6


def int8_cache_rows(dtype: Any, provider: str) -> list[str]:
    """Each INT8_CASES case twice on the same cache contents: the fp16-cache op (the dequantized
    codes rounded to T) and its Int8KV twin (the codes and scales). Per op: the output's largest
    error relative to float64 attention over its own cache, the present key's (fp16 cache: relative
    to the largest key; int8: in quantization steps, at most about 0.5), and µs per call."""
    from llm2trt.passes.ort_ops import (
        attention_model,
        attention_reference,
        attention_values,
        dequantized_caches,
        int8_cache_values,
    )
    from llm2trt.plugins import ort_library as ort_kernels

    cuda = provider == "CUDAExecutionProvider"
    library = str(ort_kernels.library(ort_kernels.device_arch() if cuda else "sm_80"))
    layers, device = (LAYERS, "cuda") if cuda else (1, "cpu")
    rows = []
    for label, lengths, seq, total, shape, qk_norm in INT8_CASES:
        heads, kv_heads, head, capacity = shape
        base = attention_values(lengths, seq, total, shape, dtype, seed=5, qk_norm=qk_norm)
        int8 = int8_cache_values(base, seed=6)
        for scale in ("KScale", "VScale"):  # cached entries of about the size of the new ones (N(0, 1))
            int8[scale] = int8[scale] * 5
        wide = dequantized_caches(int8)
        fp = {**base, "PastKey": wide["PastKey"].astype(dtype), "PastValue": wide["PastValue"].astype(dtype)}
        line = f"{np.dtype(dtype).name:<8} {label:<26}"
        times = []
        for feeds, int8_cache in ((fp, False), (int8, True)):
            model = attention_model(heads, kv_heads, head, capacity, dtype, qk_norm=qk_norm, int8_cache=int8_cache)
            sess = session(layered(model, layers), library, provider)
            runs = (20 if seq == 1 else 5) if cuda else 1
            (out, key, _value), us = layered_run(sess, feeds, layers, device, runs)
            exact, keys = attention_reference(dequantized_caches(feeds) if int8_cache else feeds, heads, kv_heads)
            out_err = key_err = 0.0
            for b, length in enumerate(lengths):
                past = 0 if seq == total else length - seq
                new = min(seq, length - past)
                ref = exact[b, :new]
                out_err = max(out_err, float(np.abs(out[b, :new].astype(np.float64) - ref).max() / np.abs(ref).max()))
                if int8_cache:
                    k_scale = feeds["KScale"].astype(np.float64)[:, None, :]
                    steps = np.abs(key[b, :, :length] * k_scale - keys[b, :, :length]) / k_scale
                    key_err = max(key_err, float(steps.max()))
                else:
                    err = np.abs(key[b, :, :length].astype(np.float64) - keys[b, :, :length]).max()
                    key_err = max(key_err, float(err / np.abs(keys[b, :, :length]).max()))
            times.append(us)
            line += f" {out_err:>9.2e} {key_err:>9.2e}{' st' if int8_cache else '   '} {us:>9.2f}"
        rows.append(line + f" {times[0] / times[1]:>7.2f}x")
    return rows


INT8_HEADER = (
    f"{'dtype':<8} {'case':<26} {'fp16-cache: out err':>19} {'key err':>9}    {'us':>9}"
    f" {'int8-cache: out err':>19} {'key err':>9}    {'us':>9} {'speedup':>8}"
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, nargs="*", default=[])
    parser.add_argument("--ops", action="store_true", help="each op alone against float64")
    parser.add_argument("--int8-cache", action="store_true", help="only the INT8-cache attention rows of --ops")
    parser.add_argument("--cpu", action="store_true", help="--ops: the attention op's CPU registration instead")
    args = parser.parse_args()
    lines = []
    provider = "CPUExecutionProvider" if args.cpu else "CUDAExecutionProvider"
    if args.ops:
        lines += [f"{'op':<20} {'dtype':<8} shape {'':<20} rel. err vs float64"]
        if not args.cpu:
            lines += op_rows(np.float16) + op_rows(np.float32)
        lines += attention_rows(np.float16, provider) + attention_rows(np.float32, provider)
    if args.ops or args.int8_cache:
        lines += [INT8_HEADER, *int8_cache_rows(np.float16, provider), *int8_cache_rows(np.float32, provider)]
    if lines:
        print("\n".join(lines), flush=True)
    if args.artifacts:  # each row printed as it is measured (a 1.1B graph's sessions take a while)
        print(f"{'artifact':<34} {'run':<12} {'rel. err':>10} {'argmax =':>9} {'kernels ms':>10} {'bodies ms':>10}")
    for artifact in args.artifacts:
        if not (artifact / "manifest.json").is_file():
            print(f"{artifact!s:<34} not an artifact (no manifest.json)", flush=True)
            continue
        check(artifact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
