"""llm2trt's MoE op on CUDA (plugins/csrc/moe.cu) against its reference body, and its decode speed.

    python scripts/check_moe_kernel.py [--quick] [--skip-decode] [--json OUT]

Accuracy: one MoE node over H=2048, I=1024, (E, k) = (8, 2) and (64, 8), decode (N = 1, 4, 16) and
prefill (N = 512) rows, in float16 and bfloat16, through ONNX Runtime CUDA with llm2trt's library
registered (each of the kernel's paths forced in turn: pairs, grouped, gemm, dense, and the one it picks)
and without it (the local-function body, dense over every expert), each against a float64
reference of the routed experts. Routing has ties (every other row has equal weights); one case has
first_expert = 4 with ids spread over twice the block, so some rows route outside it.

Speed: per decode call, (a) the kernels alone (the library's C entry `Llm2trtMoE`, TensorRT's face,
captured in a torch CUDA graph and replayed: GPU time per call), (b) the op in ONNX Runtime
(CUDA graph, IO binding, runs queued without host synchronization), (c) the body in ONNX Runtime
(IO binding, synchronous runs). Floor: the bytes of the distinct experts the batch routes to
(3 H I 2 bytes each; N = 1: its k experts) at the copy bandwidth measured in the same run.

Prefill (N = 512): the op in ONNX Runtime per path, uncaptured (synchronous runs: auto, gemm,
grouped, dense, and the body) and captured in a CUDA graph (runs queued back to back: auto,
grouped, dense; gemm cannot be captured), each captured Y checked against float64 too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIGS = ((8, 2), (64, 8))  # (experts, k): Mixtral's, Qwen3-MoE's
HIDDEN, INTER = 2048, 1024
DECODE_ROWS = (1, 4, 16)
PREFILL_ROWS = (512,)
PATHS = ("auto", "pairs", "grouped", "gemm", "dense")  # $LLM2TRT_MOE_PATH; auto: the library's own choice
ONNX_TYPES = {"float16": 10, "bfloat16": 16, "float32": 1}
INPUTS = ("X", "ExpertIds", "ExpertWeights", "GateUp", "Down")


def moe_model(elem: int, first_expert: int) -> bytes:
    """One llm2trt.MoE node over graph inputs, with its reference body (passes/moe.py)."""
    from onnx import TensorProto, helper

    from llm2trt.passes.moe import moe_function_proto
    from llm2trt.passes.ort_op_table import DOMAIN, MOE, VERSION

    typed = {"ExpertIds": TensorProto.INT64, "ExpertWeights": TensorProto.FLOAT}
    node = helper.make_node(MOE.name, list(MOE.inputs), ["Y"], domain=DOMAIN, first_expert=first_expert)
    inputs = [helper.make_tensor_value_info(n, typed.get(n, elem), None) for n in MOE.inputs]
    graph = helper.make_graph([node], "moe", inputs, [helper.make_tensor_value_info("Y", elem, None)])
    opset = 21
    model = helper.make_model(
        graph,
        functions=[moe_function_proto(opset)],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
    )
    model.ir_version = 10
    return bytes(model.SerializeToString())


def session(model: bytes, library: str | None, stream: int, graph: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(library)
    cuda = {"device_id": "0", "user_compute_stream": str(stream), "enable_cuda_graph": "1" if graph else "0"}
    return ort.InferenceSession(model, options, providers=[("CUDAExecutionProvider", cuda)])


def routing(torch: Any, rows: int, experts: int, k: int, first: int, spread: int, seed: int) -> tuple[Any, Any]:
    """Top-k ids over `spread` experts from id 0 (first + spread > experts: some outside the block
    ... and some below it when first > 0), renormalized softmax weights, every other row tied."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(rows, spread, device="cuda", generator=g)
    top, ids = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    weights[::2] = 1.0 / k
    return ids.to(torch.int64).contiguous(), weights.float().contiguous()


def reference(torch: Any, t: dict[str, Any], first: int) -> Any:
    """Y in float64 from the routed experts only."""
    x, ids, w = t["X"].double(), t["ExpertIds"], t["ExpertWeights"].double()
    experts = t["GateUp"].shape[0]
    y = torch.zeros_like(x)
    for e in range(experts):
        rows, slots = torch.nonzero(ids == e + first, as_tuple=True)
        if rows.numel() == 0:
            continue
        gate_up = t["GateUp"][e].double()
        z = x[rows] @ gate_up.T
        gate, up = z[:, :INTER], z[:, INTER:]
        h = torch.nn.functional.silu(gate) * up
        y.index_add_(0, rows, (h @ t["Down"][e].double().T) * w[rows, slots][:, None])
    return y


def bind(sess: Any, t: dict[str, Any], y: Any, elem: int) -> Any:
    binding = sess.io_binding()
    types = {"ExpertIds": 7, "ExpertWeights": 1}
    for name in INPUTS:
        tensor = t[name]
        binding.bind_input(name, "cuda", 0, types.get(name, elem), tuple(tensor.shape), tensor.data_ptr())
    binding.bind_output("Y", "cuda", 0, elem, tuple(y.shape), y.data_ptr())
    return binding


def run_ort(torch: Any, sess: Any, t: dict[str, Any], elem: int) -> Any:
    y = torch.full_like(t["X"], float("nan"))  # poisoned: a row the op leaves unwritten shows
    sess.run_with_iobinding(bind(sess, t, y, elem))
    torch.cuda.synchronize()
    return y


def rel_err(torch: Any, got: Any, exact: Any) -> float:
    err = (got.double() - exact).abs().max() / exact.abs().max()
    return float("nan") if torch.isnan(err) else float(err)


def tensors(torch: Any, dtype: Any, experts: int, k: int, rows: int, first: int, spread: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(experts * 1000 + rows)
    ids, weights = routing(torch, rows, experts, k, first, spread, seed=rows + 7)
    return {
        "X": torch.randn(rows, HIDDEN, device="cuda", generator=g).to(dtype),
        "ExpertIds": ids,
        "ExpertWeights": weights,
        "GateUp": (torch.randn(experts, 2 * INTER, HIDDEN, device="cuda", generator=g) / HIDDEN**0.5).to(dtype),
        "Down": (torch.randn(experts, HIDDEN, INTER, device="cuda", generator=g) / INTER**0.5).to(dtype),
    }


def accuracy_rows(torch: Any, library: str, dtype_name: str, quick: bool) -> list[dict[str, Any]]:
    """Every path of the library and the body against float64."""
    dtype, elem = getattr(torch, dtype_name), ONNX_TYPES[dtype_name]
    stream = torch.cuda.current_stream().cuda_stream
    cases = [(e, k, n, 0, e) for e, k in CONFIGS for n in (*DECODE_ROWS, *PREFILL_ROWS)]
    cases += [(8, 2, n, 4, 16) for n in (1, 16, 512)]  # first_expert 4, ids over [0, 16): some elsewhere
    if quick:
        cases = cases[:2]
    out = []
    sessions: dict[int, tuple[Any, Any]] = {}
    for experts, k, rows, first, spread in cases:
        if first not in sessions:
            model = moe_model(elem, first)
            sessions[first] = (session(model, library, stream), session(model, None, stream))
        ours, body = sessions[first]
        t = tensors(torch, dtype, experts, k, rows, first, spread)
        exact = reference(torch, t, first)
        row: dict[str, Any] = {"dtype": dtype_name, "E": experts, "k": k, "N": rows, "first": first}
        for path in PATHS:
            os.environ["LLM2TRT_MOE_PATH"] = path
            row[path] = rel_err(torch, run_ort(torch, ours, t, elem), exact)
        os.environ.pop("LLM2TRT_MOE_PATH")
        try:
            row["body"] = rel_err(torch, run_ort(torch, body, t, elem), exact)
        except Exception as exc:  # ONNX Runtime's CUDA provider may lack a bfloat16 kernel of the body
            row["body"] = f"failed: {str(exc).splitlines()[0][:50]}"
        out.append(row)
        print(accuracy_line(row), flush=True)
    return out


def accuracy_line(row: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:>9.2e}" if isinstance(v, float) else f" {v}"

    head = f"{row['dtype']:<9} E={row['E']:<3} k={row['k']} N={row['N']:<4} first={row['first']}"
    return head + "".join(fmt(row[p]) for p in (*PATHS, "body"))


def copy_bandwidth(torch: Any) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return float(2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9)


class Entry:
    """The library's C entry (the GEMV paths; TensorRT's plugin face calls it)."""

    def __init__(self, torch: Any, library: str) -> None:
        self.torch = torch
        self.lib = ctypes.CDLL(library)
        self.lib.Llm2trtMoEWorkspace.restype = ctypes.c_size_t
        self.lib.Llm2trtMoEWorkspace.argtypes = [ctypes.c_int, *[ctypes.c_int64] * 5]
        self.lib.Llm2trtMoE.restype = ctypes.c_int
        self.lib.Llm2trtMoE.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 6,
            *[ctypes.c_int64] * 6,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]

    def call(self, t: dict[str, Any], y: Any, elem: int, workspace: Any) -> int:
        rows, k = t["ExpertIds"].shape
        experts = t["GateUp"].shape[0]
        stream = self.torch.cuda.current_stream().cuda_stream
        pointers = [t[n].data_ptr() for n in INPUTS]
        x, ids, w, gate_up, down = pointers
        return int(
            self.lib.Llm2trtMoE(
                elem, x, ids, w, gate_up, down, y.data_ptr(), rows, k, experts, HIDDEN, INTER, 0,
                workspace.data_ptr(), workspace.numel(), stream,
            )
        )  # fmt: skip

    def gpu_us(self, t: dict[str, Any], elem: int, path: str, exact: Any, replays: int = 200) -> tuple[float, float]:
        """(µs per call in a replayed CUDA graph, relative error of that call's Y)."""
        torch = self.torch
        rows, k = t["ExpertIds"].shape
        size = self.lib.Llm2trtMoEWorkspace(elem, rows, k, t["GateUp"].shape[0], HIDDEN, INTER)
        workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
        y = torch.full_like(t["X"], float("nan"))
        os.environ["LLM2TRT_MOE_PATH"] = path
        side = torch.cuda.Stream()
        torch.cuda.synchronize()  # y and the workspace are ready before another stream uses them
        with torch.cuda.stream(side):
            assert self.call(t, y, elem, workspace) == 0
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert self.call(t, y, elem, workspace) == 0
        os.environ.pop("LLM2TRT_MOE_PATH")
        return _replayed_us(torch, graph, replays), rel_err(torch, y, exact)


def _replayed_us(torch: Any, graph: Any, replays: int) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end) * 1e3 / replays)


def ort_us(torch: Any, sess: Any, t: dict[str, Any], elem: int, runs: int, synchronize: bool, y: Any = None) -> float:
    """µs per ONNX Runtime run: queued back to back (CUDA graph) or each waited for; Y into `y`."""
    import onnxruntime as ort

    y = torch.empty_like(t["X"]) if y is None else y
    binding = bind(sess, t, y, elem)
    options = ort.RunOptions()
    if not synchronize:
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    for _ in range(3):  # warm-up (and the graph's capture)
        sess.run_with_iobinding(binding, options)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        sess.run_with_iobinding(binding, options)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs * 1e6


def speed_rows(torch: Any, library: str, bandwidth: float, quick: bool) -> list[dict[str, Any]]:
    print("decode, float16, µs per call (kernels: CUDA graph replays; ORT: CUDA graph + IO binding)", flush=True)
    entry = Entry(torch, library)
    elem, stream = ONNX_TYPES["float16"], torch.cuda.current_stream().cuda_stream
    model = moe_model(elem, 0)
    body = session(model, None, stream)
    out = []
    for experts, k in CONFIGS[:1] if quick else CONFIGS:
        for rows in DECODE_ROWS:
            t = tensors(torch, torch.float16, experts, k, rows, 0, experts)
            exact = reference(torch, t, 0)
            distinct = int(t["ExpertIds"].unique().numel())
            nbytes = 3 * HIDDEN * INTER * 2 * distinct
            row: dict[str, Any] = {"E": experts, "k": k, "N": rows, "experts_read": distinct, "MB": nbytes / 1e6}
            row["floor_us"] = nbytes / (bandwidth * 1e9) * 1e6
            for path in ("auto", "pairs", "grouped"):
                row[f"{path}_us"], row[f"{path}_err"] = entry.gpu_us(t, elem, path, exact)
            graphed = session(model, library, stream, graph=True)
            row["ort_graph_us"] = ort_us(torch, graphed, t, elem, 200, synchronize=False)
            row["body_us"] = ort_us(torch, body, t, elem, 20, synchronize=True)
            out.append(row)
            print(speed_line(row), flush=True)
    return out


def speed_line(r: dict[str, Any]) -> str:
    best = min(r["pairs_us"], r["grouped_us"])
    return (
        f"E={r['E']:<3} k={r['k']} N={r['N']:<3} experts read {r['experts_read']:>3} {r['MB']:>7.1f} MB"
        f" floor {r['floor_us']:>7.1f} | auto {r['auto_us']:>7.1f} pairs {r['pairs_us']:>7.1f}"
        f" grouped {r['grouped_us']:>7.1f} ({r['floor_us'] / best:>4.0%} of floor) | ORT+graph"
        f" {r['ort_graph_us']:>7.1f} | body {r['body_us']:>8.1f}  (errors {r['pairs_err']:.1e} {r['grouped_err']:.1e})"
    )


def prefill_rows(torch: Any, library: str, quick: bool) -> list[dict[str, Any]]:
    """Prefill (N = 512) through ONNX Runtime per path: uncaptured (synchronous runs) and captured
    in a CUDA graph (runs queued back to back, the captured Y checked against float64)."""
    elem, stream = ONNX_TYPES["float16"], torch.cuda.current_stream().cuda_stream
    model = moe_model(elem, 0)
    ours, body = session(model, library, stream), session(model, None, stream)
    out = []
    for experts, k in CONFIGS[:1] if quick else CONFIGS:
        for rows in PREFILL_ROWS:
            t = tensors(torch, torch.float16, experts, k, rows, 0, experts)
            exact = reference(torch, t, 0)
            row: dict[str, Any] = {"E": experts, "k": k, "N": rows}
            for path in ("gemm", "grouped", "dense", "auto"):
                os.environ["LLM2TRT_MOE_PATH"] = path
                row[f"{path}_us"] = ort_us(torch, ours, t, elem, 10, synchronize=True)
            for path in ("auto", "grouped", "dense"):
                # A session each: its graph is captured once, under the path forced then.
                os.environ["LLM2TRT_MOE_PATH"] = path
                y = torch.full_like(t["X"], float("nan"))
                graphed = session(model, library, stream, graph=True)
                row[f"graph_{path}_us"] = ort_us(torch, graphed, t, elem, 20, synchronize=False, y=y)
                row[f"graph_{path}_err"] = rel_err(torch, y, exact)
                del graphed
            os.environ.pop("LLM2TRT_MOE_PATH")
            row["body_us"] = ort_us(torch, body, t, elem, 5, synchronize=True)
            out.append(row)
            print(prefill_line(row), flush=True)
    return out


def prefill_line(r: dict[str, Any]) -> str:
    head = f"prefill E={r['E']:<3} k={r['k']} N={r['N']}, µs per call |"
    plain = "".join(f" {p} {r[f'{p}_us']:.0f}" for p in ("auto", "gemm", "grouped", "dense"))
    graphed = "".join(
        f" {p} {r[f'graph_{p}_us']:.0f} ({r[f'graph_{p}_err']:.1e})" for p in ("auto", "grouped", "dense")
    )
    return f"{head} uncaptured:{plain} body {r['body_us']:.0f} | CUDA graph:{graphed}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="time prefill only (no decode rows)")
    args = parser.parse_args()
    import torch

    from llm2trt.plugins import ort_library as ort_kernels

    library = str(ort_kernels.library(ort_kernels.device_arch()))
    card = torch.cuda.get_device_name(0)
    bandwidth = copy_bandwidth(torch)
    print(f"{card}: copy bandwidth {bandwidth:,.0f} GB/s; library {library}", flush=True)
    report: dict[str, Any] = {"card": card, "bandwidth_GBps": bandwidth}
    failed = 0
    # A stream of our own: ONNX Runtime captures CUDA graphs on it (the legacy default stream cannot
    # be captured), and torch's work on it is ordered with ONNX Runtime's.
    cuda: Any = torch.cuda  # torch's stubs leave Stream() untyped
    with cuda.stream(cuda.Stream()):
        sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
            ("accuracy", lambda: _accuracy(torch, library, args.quick))
        ]
        if not args.skip_speed and not args.skip_decode:
            sections += [("decode", lambda: speed_rows(torch, library, bandwidth, args.quick))]
        if not args.skip_speed:
            sections += [("prefill", lambda: prefill_rows(torch, library, args.quick))]
        for name, run in sections:
            try:
                report[name] = run()
            except Exception:  # one section's failure still lets the others report
                traceback.print_exc()
                failed += 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


def _accuracy(torch: Any, library: str, quick: bool) -> list[dict[str, Any]]:
    print(f"{'accuracy (rel. err vs float64)':<40}" + "".join(f"{p:>9}" for p in (*PATHS, "body")), flush=True)
    return [r for d in ("float16", "bfloat16") for r in accuracy_rows(torch, library, d, quick)]


if __name__ == "__main__":
    sys.exit(main())
