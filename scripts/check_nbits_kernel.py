"""llm2trt's NBits kernels (plugins/csrc/qgemv.cu: weight-only INT4 / INT8) on CUDA against float64,
and their one-row speed against the fp16 kernels of the same shape.

    python scripts/check_nbits_kernel.py [--quick] [--skip-speed] [--skip-accuracy] [--variant DEFINES ...]
        [--library PATH] [--compare PATH ...]

Needs torch with CUDA and nvcc, not ONNX Runtime: the library (plugins/ort_library.py) is called
through its C entry `Llm2trtNBits` (one row: the fused kernel; more rows: W dequantized to T, then
cuBLAS through torch's handle) and `Llm2trtOneRow` (the fp16 kernels).

Accuracy: every NBits op, INT4 and INT8, blocks 32, 64, 128 and K (one block a row), float16 and
float32, rows 1, 4, 16 and 512, K 2048 (--quick: only it), 576 and 896, and shapes the fast kernel
refuses (the generic one's), Y (and Sum) against a float64 reference of the dequantized weight;
then one row at the shapes that take the one-row kernel's other forms (more rows a thread, many
tiles a block, two chunks a thread, the wide block: K 2048, 5632 and 20480) with blocks 32, 128
and K.

Speed: the 1.1B Llama decode layers (qkv, o, gate+up with SwiGLU, down, lm_head with float32
logits), one row, INT4 in blocks of 128 and INT8 per output channel, against the fp16 kernels:
`copies` launches with their own weights (more bytes than L2) captured in one CUDA graph and
replayed; GB/s = the bytes read (codes, scales, zero points) / time, against the copy bandwidth
measured in the same run. Then a step's GEMV time (22 layers x 4 + lm_head) per format, and the
many-row path (4, 16, 512 rows) against fp16 cuBLAS. `--variant "-DNAME=VALUE ..."` (repeatable)
times builds with qgemv.cu's tuning macros set too (LLM2TRT_NBITS_ROWS, LLM2TRT_NBITS_TILES,
LLM2TRT_NBITS_LOADS, LLM2TRT_NBITS_BLOCKS, LLM2TRT_NBITS_THREADS, LLM2TRT_NBITS_HALF,
LLM2TRT_PDL_BYTES), after the default build's tables (their fp16 column is the default table's).
`--library PATH` uses a library built beforehand (no nvcc needed, nor llm2trt importable) and
`--compare PATH` (repeatable) times other prebuilt ones, as variants are timed (scripts/gpu_nbits.sh
runs it so on a GPU lease). `--skip-many-rows` leaves out the many-row table.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from functools import partial

import torch
from bench_ort_kernels import graph_us, load_library, open_library
from common import copy_bandwidth

FLOAT16, FLOAT = 10, 1  # ONNX's element types
ONNX_TYPE = {torch.float16: FLOAT16, torch.float32: FLOAT}
OPS = (
    "LinearNBits",
    "RMSNormLinearNBits",
    "SkipRMSNormLinearNBits",
    "SkipRMSNormSwiGLUNBits",
    "LinearNBitsF32",
    "RMSNormLinearNBitsF32",
    "SkipRMSNormLinearNBitsF32",
)
LAYERS = 22  # TinyLlama 1.1B
DECODE = (  # layer, op, K, N (weight rows)
    ("qkv", "SkipRMSNormLinearNBits", 2048, 2560),
    ("o", "LinearNBits", 2048, 2048),
    ("gate+up", "SkipRMSNormSwiGLUNBits", 2048, 2 * 5632),
    ("down", "LinearNBits", 5632, 2048),
    ("lm_head", "SkipRMSNormLinearNBitsF32", 2048, 32000),
)
FORMATS = (("int4 g128", 4, 128), ("int8 per-ch", 8, 0))  # block 0: K (one block a row)
# K, N for one row only: more rows a thread and a partial last tile (2048 x 2500, 1500), blocks
# looping over many tiles (2048 x 20000), a block's columns covering K at once or two chunks a
# thread (5632), the wide block (20480: INT4 640 chunks, INT8 1,280).
ONE_ROW_SHAPES = ((2048, 2500), (2048, 1500), (2048, 20000), (5632, 2048), (5632, 400), (20480, 300))


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.Llm2trtNBits.restype = ctypes.c_int
    lib.Llm2trtNBits.argtypes = [
        ctypes.c_char_p,
        ctypes.c_int,
        *[ctypes.c_void_p] * 10,
        *[ctypes.c_int64] * 3,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_float,
        *[ctypes.c_void_p] * 3,
    ]
    return lib


class Case:
    """One NBits op's tensors on the GPU: rows of X (and Skip, Gamma), codes packed as the op takes
    them, scales, zero points around the symmetric one, and every output buffer."""

    def __init__(self, op: str, rows: int, k: int, n: int, bits: int, block: int, dtype: torch.dtype, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.op, self.rows, self.k, self.n, self.bits, self.block, self.dtype = op, rows, k, n, bits, block, dtype
        levels, groups = 1 << bits, k // block

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device="cuda", generator=g)

        self.x, self.skip = randn(rows, k).to(dtype), randn(rows, k).to(dtype)
        self.gamma = (1 + 0.1 * randn(k)).to(dtype)
        self.codes = torch.randint(0, levels, (n, k), device="cuda", generator=g, dtype=torch.uint8)
        self.zeros = torch.randint(levels // 2 - 2, levels // 2 + 2, (n, groups), device="cuda", generator=g)
        self.zeros = self.zeros.to(torch.uint8)
        spread = levels / 12**0.5  # the codes' standard deviation: weights ~ 1 / sqrt(K)
        uniform = torch.rand(n, groups, device="cuda", generator=g)
        self.scales = ((0.5 + uniform) / (spread * k**0.5)).to(dtype)
        self.w = pack(self.codes, bits)
        n_out = n // 2 if "SwiGLU" in op else n
        y_dtype = torch.float32 if op.endswith("F32") else dtype
        self.y = torch.empty(rows, n_out, device="cuda", dtype=y_dtype)
        self.sum = torch.empty(rows, k, device="cuda", dtype=dtype)
        self.normed = torch.empty(rows, k, device="cuda", dtype=dtype)
        self.gate_up = torch.empty(rows, n, device="cuda", dtype=dtype)
        self.dequantized = torch.empty(n * k if rows > 1 else 1, device="cuda", dtype=dtype)

    def call(self, lib: ctypes.CDLL, copy: tuple[torch.Tensor, ...] = ()) -> None:
        """The op on this case, or on `copy`'s (W, Scales, ZeroPoints, Y) in place of its own."""
        w, scales, zeros, y = copy or (self.w, self.scales, self.zeros, self.y)
        pointers = [self.x, self.skip, self.gamma, w, scales, zeros]
        outputs = [y, self.sum, self.normed, self.gate_up]
        rc = lib.Llm2trtNBits(
            self.op.encode(),
            ONNX_TYPE[self.dtype],
            *(t.data_ptr() for t in (*pointers, *outputs)),
            self.rows,
            self.k,
            self.n,
            self.bits,
            self.block,
            1e-5,
            self.dequantized.data_ptr(),
            torch.cuda.current_blas_handle() if self.rows > 1 else 0,  # type: ignore[no-untyped-call]
            torch.cuda.current_stream().cuda_stream,
        )
        if rc != 0:
            raise RuntimeError(f"{self.op}: Llm2trtNBits returned {rc}")

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Y and Sum in float64 (Sum rounded to T, as the residual stream is)."""
        v = self.x.double()
        total = (self.x.float() + self.skip.float()).to(self.dtype)
        if "Skip" in self.op:
            v = total.double()
        if "RMSNorm" in self.op:
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * self.gamma.double()
        blocks = self.codes.double().view(self.n, -1, self.block) - self.zeros.double()[..., None]
        weight = (blocks * self.scales.double()[..., None]).view(self.n, self.k)
        z = v @ weight.T
        if "SwiGLU" in self.op:
            gate, up = z.chunk(2, dim=-1)
            z = torch.nn.functional.silu(gate) * up
        return z, total


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] as the op's W: INT4 two a byte, the even k in the low nibble."""
    if bits == 8:
        return codes.contiguous()
    pairs = codes.view(codes.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def accuracy(lib: ctypes.CDLL, quick: bool, out: str | None) -> int:
    """Every op, format, block, type and row count against float64: each case's line to `out`, the
    largest error per type, width and row count printed; returns the failures."""
    shapes = [(2048, 640)] + ([] if quick else [(576, 96), (896, 128)])
    odd = [("LinearNBits", 200, 40, 40), ("SkipRMSNormSwiGLUNBits", 192, 48, 16)]  # the generic kernel
    row_counts = (1, 4, 16, 512)
    failures, lines = 0, []
    worst: dict[tuple[str, int, int], float] = {}
    for dtype in (torch.float16, torch.float32):
        # float16: Y rounded to float16 (with more rows, W and Normed too, as cuBLAS reads them)
        bound = 4e-3 if dtype == torch.float16 else 2e-5
        blocks = [(k, n, block) for k, n in shapes for block in (32, 64, 128, k)]
        cases = [(op, k, n, bits, block, row_counts) for op in OPS for k, n, block in blocks for bits in (4, 8)]
        cases += [(op, k, n, bits, block, row_counts) for op, k, block, n in odd for bits in (4, 8)]
        cases += [
            (op, k, n, bits, block, (1,))
            for op in OPS
            for k, n in ONE_ROW_SHAPES
            for block in (32, 128, k)
            for bits in (4, 8)
        ]
        for op, k, n, bits, block, counts in cases:
            if k % block:
                continue
            errs = []
            for rows in counts:
                case = Case(op, rows, k, n, bits, block, dtype, seed=rows + k + bits + block)
                case.call(lib)
                torch.cuda.synchronize()
                want, total = case.reference()
                err = float((case.y.double() - want).abs().max() / want.abs().max())
                same_sum = "Skip" not in op or bool(torch.equal(case.sum, total))
                failures += int(not (err < bound and same_sum))
                key = (str(dtype)[6:], bits, rows)
                worst[key] = max(worst.get(key, 0.0), err)
                errs.append(f"{err:.1e}{'' if err < bound else ' FAIL'}{'' if same_sum else ' SUM'}")
                if err >= bound or not same_sum:
                    print(f"FAIL {op} {key} K={k} N={n} block={block}: {err:.2e} sum equal: {same_sum}")
            lines.append(f"{op:<26} {str(dtype)[6:]:<8} {bits:>4} {block:>5} {k:>5} {n:>5}  {' / '.join(errs)}")
    if out:
        with open(out, "w") as f:
            f.write(f"{'op':<26} {'type':<8} {'bits':>4} {'block':>5} {'K':>5} {'N':>5}  rel. err, rows {row_counts}\n")
            f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} op/shape/block cases x rows {row_counts}: largest rel. err vs float64")
    for (dtype_name, bits, rows), err in sorted(worst.items()):
        print(f"  {dtype_name:<8} int{bits} rows {rows:>3}: {err:.1e}")
    print(f"accuracy: {failures} failures")
    return failures


def one_row_us(lib: ctypes.CDLL, op: str, k: int, n: int, bits: int, block: int) -> tuple[float, int]:
    """GPU µs per call of the one-row NBits kernel (own weights per copy) and the bytes it reads."""
    case = Case(op, 1, k, n, bits, block, torch.float16, seed=1)
    nbytes = case.w.numel() + case.zeros.numel() + 2 * case.scales.numel()
    copies = max(2, -(-(400 << 20) // nbytes))
    own = [tuple(t.clone() for t in (case.w, case.scales, case.zeros, case.y)) for _ in range(copies)]

    def launch() -> None:
        for copy in own:
            case.call(lib, copy)

    return graph_us(launch, copies), nbytes


def fp16_us(lib: ctypes.CDLL, op: str, k: int, n: int) -> float:
    """The fp16 one-row kernel of the same op and shape (`Llm2trtOneRow`)."""
    base = op.replace("NBits", "")
    nbytes = n * k * 2
    copies = max(2, -(-(400 << 20) // nbytes))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    x, skip = (torch.randn(1, k, device="cuda", dtype=torch.float16) for _ in range(2))
    gamma = torch.ones(k, device="cuda", dtype=torch.float16)
    n_out = n // 2 if "SwiGLU" in op else n
    y_dtype = torch.float32 if op.endswith("F32") else torch.float16
    ys = [torch.empty(1, n_out, device="cuda", dtype=y_dtype) for _ in range(copies)]
    total = torch.empty(1, k, device="cuda", dtype=torch.float16)

    def launch() -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for w, y in zip(ws, ys, strict=True):
            pointers = (x, skip, gamma, w, y, total)
            if lib.Llm2trtOneRow(base.encode(), FLOAT16, *(t.data_ptr() for t in pointers), k, n, 1e-5, stream):
                raise RuntimeError(f"{base}: launch failed")

    return graph_us(launch, copies)


def speed(lib: ctypes.CDLL, bandwidth: float, fp16: dict[str, float] | None = None) -> dict[str, float]:
    """The decode layers' table and step estimate; `fp16` (a default table's, by layer) skips
    timing the fp16 kernels again. Returns the fp16 times by layer."""
    print(f"\ncopy bandwidth {bandwidth:.0f} GB/s; fp16 activations, one row, GPU µs per call in a CUDA graph")
    print(f"{'layer':<8} {'format':<12} {'K':>5} {'N':>6} {'µs':>8} {'GB/s':>7} {'% copy':>7} {'/ fp16':>7}")
    step = {"fp16": 0.0, **{name: 0.0 for name, _, _ in FORMATS}}
    fp16_times = {}
    for label, op, k, n in DECODE:
        times = {"fp16": fp16[label] if fp16 else fp16_us(lib, op, k, n)}
        fp16_times[label] = times["fp16"]
        rows = [
            f"{label:<8} {'fp16':<12} {k:>5} {n:>6} {times['fp16']:>8.2f} {n * k * 2 / times['fp16'] / 1e3:>7.0f}"
            f" {n * k * 2 / times['fp16'] / 1e3 / bandwidth:>7.0%} {1:>7.2f}"
        ]
        for name, bits, block in FORMATS:
            us, nbytes = one_row_us(lib, op, k, n, bits, block or k)
            times[name] = us
            rate = nbytes / us / 1e3
            rows.append(
                f"{label:<8} {name:<12} {k:>5} {n:>6} {us:>8.2f} {rate:>7.0f} {rate / bandwidth:>7.0%}"
                f" {us / times['fp16']:>7.2f}"
            )
        print("\n".join(rows))
        for name, us in times.items():
            step[name] += us * (1 if label == "lm_head" else LAYERS)
    print(f"\nstep estimate ({LAYERS} layers x (qkv, o, gate+up, down) + lm_head), GEMV kernels only:")
    for name, us in step.items():
        print(f"  {name:<12} {us:>8.1f} µs  {us / step['fp16']:.2f} x fp16")
    return fp16_times


def many_rows(lib: ctypes.CDLL) -> None:
    """The many-row path (dequantize, norm, cuBLAS, SwiGLU) against fp16 cuBLAS's GEMM alone (no
    norm or activation), each captured in a CUDA graph: GPU µs per call."""
    print(f"\n{'layer':<8} {'rows':>5} {'int4 g128 µs':>13} {'fp16 GEMM µs':>13} {'ratio':>6}")
    for label, op, k, n in DECODE[:4]:
        for rows in (4, 16, 512):
            case = Case(op, rows, k, n, 4, 128, torch.float16, seed=2)
            weight = torch.randn(n, k, device="cuda", dtype=torch.float16)
            ours = graph_us(partial(case.call, lib), 1)
            theirs = graph_us(partial(torch.nn.functional.linear, case.x, weight), 1)
            print(f"{label:<8} {rows:>5} {ours:>13.1f} {theirs:>13.1f} {ours / theirs:>6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="accuracy: K 2048 and the generic kernel's shapes")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", help="write every accuracy case's line here")
    parser.add_argument("--variant", action="append", default=[], help="-DNAME=VALUE ...: a build to time too")
    parser.add_argument("--library", help="a library built beforehand, in place of building one")
    parser.add_argument("--compare", action="append", default=[], help="another prebuilt library to time")
    parser.add_argument("--skip-many-rows", action="store_true")
    args = parser.parse_args()
    lib = bind(open_library(args.library) if args.library else load_library())
    print(f"device: {torch.cuda.get_device_name(0)}")
    failures = 0 if args.skip_accuracy else accuracy(lib, args.quick, args.out)
    if not args.skip_speed:
        bandwidth = copy_bandwidth()
        fp16 = speed(lib, bandwidth)
        if not args.skip_many_rows:
            many_rows(lib)
        for defines in args.variant:
            print(f"\nbuild: {defines}")
            speed(bind(load_library(defines)), bandwidth, fp16)
        for path in args.compare:
            print(f"\nlibrary: {path}")
            speed(bind(open_library(path)), bandwidth, fp16)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
