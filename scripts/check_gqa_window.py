"""Which keys ONNX Runtime's com.microsoft.GroupQueryAttention lets a query see with
`local_window_size` = W, on each provider: W keys (the query's own included, transformers' sliding
window) or W + 1 (flash attention's window_size_left = W)?

    python scripts/check_gqa_window.py [--providers CPUExecutionProvider CUDAExecutionProvider]

One layer, separate (unpacked) q, k and v as the QK-norm graphs of `--kv-form gqa` feed it, rotary
inside, fp16 and fp32, batch 2: a prefill of P tokens (P > W) and then
D decode steps, each with the cache grown by one (past -> present), against NumPy references that
see W and W + 1 keys. A provider matches the hypothesis whose error is at rounding level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HEADS, KV_HEADS, HEAD = 4, 1, 64
WINDOW, PROMPT, DECODE = 6, 11, 6


def model(dtype: np.dtype, window: int, past_len_dim: str = "past") -> bytes:
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    io = [
        helper.make_tensor_value_info("q", elem, ["b", "s", HEADS * HEAD]),
        helper.make_tensor_value_info("k", elem, ["b", "s", KV_HEADS * HEAD]),
        helper.make_tensor_value_info("v", elem, ["b", "s", KV_HEADS * HEAD]),
        helper.make_tensor_value_info("past_key", elem, ["b", KV_HEADS, past_len_dim, HEAD]),
        helper.make_tensor_value_info("past_value", elem, ["b", KV_HEADS, past_len_dim, HEAD]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", elem, ["m", HEAD // 2]),
        helper.make_tensor_value_info("sin", elem, ["m", HEAD // 2]),
    ]
    outs = [
        helper.make_tensor_value_info("out", elem, ["b", "s", HEADS * HEAD]),
        helper.make_tensor_value_info("present_key", elem, ["b", KV_HEADS, "t", HEAD]),
        helper.make_tensor_value_info("present_value", elem, ["b", KV_HEADS, "t", HEAD]),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in io],
        [o.name for o in outs],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        scale=1 / np.sqrt(HEAD),
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=window,
    )
    graph = helper.make_graph([node], "gqa", io, outs)
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9
    )
    return m.SerializeToString()


def rotate(x: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    low, high = x[..., :half], x[..., half:]
    return np.concatenate([low * cos[pos] - high * sin[pos], high * cos[pos] + low * sin[pos]], axis=-1)


def reference(
    qs: np.ndarray, ks: np.ndarray, vs: np.ndarray, length: int, seen: int, cos: np.ndarray, sin: np.ndarray
) -> np.ndarray:
    """One row's outputs at positions 0..length-1 (float64), each query seeing its `seen` latest keys."""
    q = qs.reshape(-1, HEADS, HEAD)[:length].astype(np.float64)
    k = ks.reshape(-1, KV_HEADS, HEAD)[:length].astype(np.float64)
    v = vs.reshape(-1, KV_HEADS, HEAD)[:length].astype(np.float64)
    q = np.stack([rotate(q[i], i, cos, sin) for i in range(length)])
    k = np.stack([rotate(k[i], i, cos, sin) for i in range(length)])
    group = HEADS // KV_HEADS
    out = np.zeros((length, HEADS, HEAD))
    for i in range(length):
        lo = max(0, i - seen + 1) if seen > 0 else 0
        for h in range(HEADS):
            s = k[lo : i + 1, h // group] @ q[i, h] / np.sqrt(HEAD)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[lo : i + 1, h // group]
    return out.reshape(length, HEADS * HEAD)


def run(provider: str, dtype: np.dtype, window: int) -> dict[str, float]:
    """Max |error| of the provider's outputs (prefill and decode) against each hypothesis."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    lengths = [PROMPT, PROMPT]  # (padded rows are not this check's question)
    total = PROMPT + DECODE
    q = rng.standard_normal((2, total, HEADS * HEAD)).astype(dtype)
    k = rng.standard_normal((2, total, KV_HEADS * HEAD)).astype(dtype)
    v = rng.standard_normal((2, total, KV_HEADS * HEAD)).astype(dtype)
    angles = np.arange(64)[:, None] / 10000 ** (np.arange(HEAD // 2) / (HEAD // 2))
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model(dtype, window), options, providers=[provider])
    got: list[list[np.ndarray]] = [[], []]
    empty = np.zeros((2, KV_HEADS, 0, HEAD), dtype)
    feeds = {
        "q": q[:, :PROMPT],
        "k": k[:, :PROMPT],
        "v": v[:, :PROMPT],
        "past_key": empty,
        "past_value": empty,
        "seqlens_k": np.array(lengths, np.int32) - 1,
        "total_sequence_length": np.array(PROMPT, np.int32),
        "cos": cos,
        "sin": sin,
    }
    out, pk, pv = session.run(None, feeds)
    for row, n in enumerate(lengths):
        got[row].append(out[row, :n])
    # Decode: one token a step, the cache grown by one slot (past -> present).
    for step in range(DECODE):
        pos = [n + step for n in lengths]
        width = PROMPT + step  # slots in the buffer before this step
        feeds = {
            "q": np.stack([q[r, p : p + 1] for r, p in enumerate(pos)]),
            "k": np.stack([k[r, p : p + 1] for r, p in enumerate(pos)]),
            "v": np.stack([v[r, p : p + 1] for r, p in enumerate(pos)]),
            "past_key": pk[:, :, :width],
            "past_value": pv[:, :, :width],
            "seqlens_k": np.array(pos, np.int32),
            "total_sequence_length": np.array(width + 1, np.int32),
            "cos": cos,
            "sin": sin,
        }
        out, pk, pv = session.run(None, feeds)
        for row in range(2):
            got[row].append(out[row])
    errors = {}
    for seen_name, seen in (("W", window), ("W+1", window + 1), ("global", 0)):
        worst = 0.0
        for row, n in enumerate(lengths):
            # Row r's tokens: positions 0..n-1 from q/k/v[:n], then decode tokens at n..n+DECODE-1.
            want = reference(q[row], k[row], v[row], n + DECODE, seen, cos.astype(np.float64), sin.astype(np.float64))
            have = np.concatenate(got[row]).astype(np.float64)
            worst = max(worst, float(np.abs(have - want).max()))
        errors[seen_name] = worst
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for provider in args.providers:
        for dtype in (np.float16, np.float32):
            name = f"{provider} {np.dtype(dtype).name} local_window_size={WINDOW}"
            try:
                errors = run(provider, dtype, WINDOW)
            except Exception as exc:  # a provider may refuse a dtype
                print(f"{name}: failed: {str(exc).splitlines()[0][:200]}")
                results[name] = {"failed": str(exc)[:300]}
                continue
            best = min(errors, key=errors.get)
            print(
                f"{name}: max |error| vs W keys {errors['W']:.2e}, vs W+1 keys {errors['W+1']:.2e}, "
                f"vs global {errors['global']:.2e} -> sees {best}"
            )
            results[name] = {**errors, "matches": best}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
