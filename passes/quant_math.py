"""The numerics of Q/DQ quantization, in NumPy: symmetric scales and codes (per output channel, or
INT4 blocks of input channels), fake quantization, SmoothQuant's and AWQ's searches, the W8A8 pair
cap, GPTQ's error-compensating rounding, and the per-channel activation statistics (and, for GPTQ,
the inputs' Gram matrices) calibration collects.

These are the reference the quantization pass (`llm2trt.passes.qdq`) computes the graph's constants
with, and the methods (`llm2trt.passes.quant_methods`) search with; tests check them against
independent arithmetic and the graph against a fake-quantized PyTorch model. Nothing here reads or
writes a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError

AWQ_GRID = 20  # exponents 0, 0.05, ..., 0.95 (0 is plain rounding: AWQ is never worse on its rows)
AWQ_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5 of each block's amax
SQ_STRENGTHS = tuple(i / 10 for i in range(11))  # searched when --alpha is not given
ACT_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # of a static activation range
PAIR_LIMIT = 128  # the largest |q[2k]| + |q[2k+1]| of a W8A8 weight: 255 * 128 <= 32767 (see bounded_pairs)
AWQ_SCALE_COLUMNS = 2048  # output channels per weight the exponent search scores (a fixed sample)
SEARCH_ROWS = 256  # calibration tokens sampled per input tensor for the searches (bounds memory)
GPTQ_DAMPENING = 0.01  # of the Hessian's mean diagonal, added to it: keeps the inverse well conditioned
GPTQ_BLOCK = 128  # input channels updated together (lazy batch): the rest get one matrix product per block
_EPS = 1e-8


class QuantFormat(Protocol):
    """What the numerics read of a quantization method (`quant_methods.QuantMethod` is one): its
    types and whether weight scales are per block."""

    @property
    def name(self) -> str: ...
    @property
    def weights(self) -> DType: ...  # INT8 | FP8 | INT4
    @property
    def activations(self) -> DType | None: ...  # None: weight-only
    @property
    def blockwise(self) -> bool: ...  # scales per block of input channels, else per output channel


def qmax(dtype: DType) -> float:
    """The largest magnitude a symmetric scale maps amax to (TensorRT takes zero points of 0 only)."""
    limits = {DType.INT8: 127.0, DType.INT4: 7.0, DType.FP8: 448.0}
    if dtype not in limits:
        raise InputError(f"{dtype.value} is not a quantized type")
    return limits[dtype]


def _expand(scale: np.ndarray, method: QuantFormat, group: int) -> np.ndarray:
    out: np.ndarray = np.repeat(scale, group, axis=0) if method.blockwise else scale[None, :]
    return out


def weight_scale(w: np.ndarray, method: QuantFormat, group: int, clip: np.ndarray | None = None) -> np.ndarray:
    """Symmetric scales of a [in, out] weight: [out] per channel, [in // group, out] per block;
    `clip` shrinks each block's amax (AWQ's clipping search)."""
    a = np.abs(w.astype(np.float32))
    amax = a.reshape(-1, group, a.shape[1]).max(axis=1) if method.blockwise else a.max(axis=0)
    if clip is not None:
        amax = amax * clip
    scale = amax / qmax(method.weights)
    if bounded_pairs(method):  # no pair of input channels may sum past PAIR_LIMIT codes
        scale = np.maximum(scale, _pair_sums(a).max(axis=0, initial=0.0) / PAIR_LIMIT)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def bounded_pairs(method: QuantFormat) -> bool:
    """INT8 weights read by INT8 activations. ONNX Runtime on x86 multiplies them as uint8 activations (code
    + 128) x int8 weights, and CPUs without VNNI add the products of input channels 2k and 2k+1 in saturating
    int16 (vpmaddubsw): |q[2k]| + |q[2k+1]| <= PAIR_LIMIT keeps every such sum exact (255 * 128 <= 32767).
    SmolLM2 int8-sq (scripts/quant_sensitivity.py): perplexity +3.19%, unbounded +3.00%, 7-bit codes +7.62%."""
    return method.weights is DType.INT8 and method.activations is DType.INT8


def _pair_sums(a: np.ndarray) -> np.ndarray:
    """a[2k] + a[2k+1] along the input channels (an odd last one alone)."""
    even = a.shape[0] // 2 * 2
    pairs: np.ndarray = a[0:even:2] + a[1:even:2]
    return np.concatenate([pairs, a[even:]]) if even < a.shape[0] else pairs


def quantize_weight(w: np.ndarray, scale: np.ndarray, method: QuantFormat, group: int) -> np.ndarray:
    x = w.astype(np.float32) / _expand(scale, method, group)
    codes = quantize_values(x, method.weights)
    return _limit_pairs(codes, x) if bounded_pairs(method) else codes


def _limit_pairs(codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where rounding took a pair's |code| sum past PAIR_LIMIT (its |x| sum is within it: by 1 at most),
    the code rounded further from zero goes one step back towards it."""
    even = codes.shape[0] // 2 * 2
    q = codes.astype(np.int16)
    low, high = q[0:even:2], q[1:even:2]  # views: the in-place updates below land in q
    over = np.abs(low) + np.abs(high) > PAIR_LIMIT
    if over.any():
        up_low = np.abs(low) - np.abs(x[0:even:2])
        up_high = np.abs(high) - np.abs(x[1:even:2])
        first = over & (up_low >= up_high)
        low -= np.sign(low) * first
        high -= np.sign(high) * (over & ~first)
    out: np.ndarray = q.astype(codes.dtype)
    return out


def quantize_values(x: np.ndarray, dtype: DType) -> np.ndarray:
    """x (already divided by its scale) as `dtype`, rounding and saturating as ONNX QuantizeLinear does."""
    high = qmax(dtype)
    codes = np.clip(x, -high, high) if dtype is DType.FP8 else np.clip(np.rint(x), -high - 1, high)
    out: np.ndarray = codes.astype(dtype.numpy)
    return out


def dequantize_weight(q: np.ndarray, scale: np.ndarray, method: QuantFormat, group: int) -> np.ndarray:
    out: np.ndarray = q.astype(np.float32) * _expand(scale, method, group)
    return out


def _integer_blocks(method: QuantFormat) -> bool:
    """Whether `_fake_quant_blocks` rounds this method's weights: integer codes in blocks, no pair limit."""
    return method.blockwise and method.weights in (DType.INT4, DType.INT8) and not bounded_pairs(method)


def fake_quant_weight(w: np.ndarray, method: QuantFormat, group: int, clip: np.ndarray | None = None) -> np.ndarray:
    if _integer_blocks(method):
        blocks = _blocks(w, group)
        amax = _block_amax(blocks)
        return _fake_quant_blocks(blocks, amax * clip if clip is not None else amax, qmax(method.weights))
    scale = weight_scale(w, method, group, clip)
    return dequantize_weight(quantize_weight(w, scale, method, group), scale, method, group)


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """A [in, out] weight as float32 [in // group, group, out] (a view when it is float32 already)."""
    out: np.ndarray = w.astype(np.float32, copy=False).reshape(-1, group, w.shape[1])
    return out


def _block_amax(blocks: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))  # no |w| copy of the weight
    return out


def _fake_quant_blocks(blocks: np.ndarray, amax: np.ndarray, high: float) -> np.ndarray:
    """Integer blocks rounded and scaled back, in one buffer: the same float32 arithmetic as
    quantize_weight then dequantize_weight (bit for bit, tests/passes/test_quant.py), without their
    full-size copies. The AWQ searches run it 20-30 times per weight: 10x faster at 4096 x 11008."""
    ratio = amax / high
    scale = np.where(ratio > 0, ratio, 1.0).astype(np.float32)[:, None, :]
    x = blocks / scale
    np.rint(x, out=x)
    np.clip(x, -high - 1, high, out=x)
    x *= scale
    out: np.ndarray = x.reshape(-1, x.shape[2])
    return out


def smooth_scale(act_amax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s = amax_x^a / amax_w^(1-a) over the layers sharing the input."""
    w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    x_amax = act_amax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = x_amax**alpha / w_amax ** (1.0 - alpha)
    s = np.where((x_amax > 0) & (w_amax > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def fake_quant_values(x: np.ndarray, scale: float, dtype: DType) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear with one scale, in NumPy."""
    return quantize_values(x / np.float32(scale), dtype).astype(np.float32) * np.float32(scale)


def activation_scale(act_amax: np.ndarray, s: np.ndarray | None, dtype: DType, clip: float = 1.0) -> float:
    """The static per-tensor scale of an input whose channels are divided by s (SmoothQuant), its
    range clipped to `clip` of the amax."""
    amax = act_amax / s if s is not None else act_amax
    return max(float(amax.max()), _EPS) * clip / qmax(dtype)


def _w8a8_loss(
    rows: np.ndarray, act_amax: np.ndarray, weights: Sequence[np.ndarray], method: QuantFormat
) -> Callable[[np.ndarray | None, float], float]:
    """The squared error of X W against its W8A8 version, for a migration s (None: none) and an
    activation clip, on the calibration rows (squared, not per-token relative: the rows include the
    largest tokens, whose accuracy matters beyond their number; on SmolLM2 a per-token relative
    error chose worse)."""
    act = method.activations
    if act is None:
        raise ValueError(f"{method.name} quantizes no activations")
    x = rows.astype(np.float32)
    reference = [x @ w for w in weights]

    def loss(s: np.ndarray | None, clip: float) -> float:
        ones = np.ones(x.shape[1], np.float32) if s is None else s
        xq = fake_quant_values(x / ones, activation_scale(act_amax, s, act, clip), act)
        return sum(
            float(np.square(xq @ fake_quant_weight(w * ones[:, None], method, 0) - ref).sum())
            for w, ref in zip(weights, reference, strict=True)
        )

    return loss


def sq_search(
    rows: np.ndarray,
    act_amax: np.ndarray,
    weights: Sequence[np.ndarray],
    method: QuantFormat,
    strengths: Sequence[float] = SQ_STRENGTHS,
) -> tuple[np.ndarray, float, float]:
    """SmoothQuant per group: the migration strength among `strengths`, then the clipping of the
    activation range (1, 0.95, .., 0.5 of amax), each the one with the least W8A8 error on the
    calibration rows. Returns s, a and the clip."""
    loss = _w8a8_loss(rows, act_amax, weights, method)
    scales = {a: smooth_scale(act_amax, weights, a) for a in strengths}
    a = min(strengths, key=lambda a: loss(scales[a], 1.0)) if len(strengths) > 1 else strengths[0]
    return scales[a], a, min(ACT_CLIP_RATIOS, key=lambda c: loss(scales[a], c))


def clip_search(rows: np.ndarray, act_amax: np.ndarray, weights: Sequence[np.ndarray], method: QuantFormat) -> float:
    """The activation clip alone, for an input nothing was migrated out of."""
    loss = _w8a8_loss(rows, act_amax, weights, method)
    return min(ACT_CLIP_RATIOS, key=lambda c: loss(None, c))


def _output_error(rows: np.ndarray, weights: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> float:
    return float(sum(np.square(rows @ (a - w)).sum() for w, a in zip(weights, approx, strict=True)))


def _scaled_error(rows: np.ndarray, w: np.ndarray, s: np.ndarray, method: QuantFormat, group: int) -> float:
    """|| rows (Q(diag(s) W) / s - W) ||^2, each step in place on one copy of the weight."""
    delta = fake_quant_weight(w * s[:, None], method, group)
    delta /= s[:, None]
    delta -= w
    return float(np.square(rows @ delta).sum())


def _some_columns(w: np.ndarray) -> np.ndarray:
    """At most AWQ_SCALE_COLUMNS output channels of a [in, out] weight, a fixed uniform sample. Each
    channel rounds on its own (block scales are per output channel), so the sample's loss is exactly
    part of the whole loss: the exponent search's estimate, 5x less work on a 7B MLP."""
    if w.shape[1] <= AWQ_SCALE_COLUMNS:
        return w
    picked = np.sort(np.random.default_rng(0).choice(w.shape[1], AWQ_SCALE_COLUMNS, replace=False))
    out: np.ndarray = w[:, picked]
    return out


def awq_scale(
    rows: np.ndarray, mean_abs: np.ndarray, weights: Sequence[np.ndarray], method: QuantFormat, group: int
) -> tuple[np.ndarray, float, float]:
    """AWQ's per-channel scale for layers sharing an input: s = mean|x|^a, a on a grid, minimising
    || X W - (X/s) Q(diag(s) W) ||^2 over the calibration rows. Returns s, a, and the loss ratio to
    plain rounding (a = 0)."""
    x = rows.astype(np.float32)
    sampled = [_some_columns(w) for w in weights]
    tried: list[tuple[float, float, np.ndarray]] = []
    for i in range(AWQ_GRID):
        a = i / AWQ_GRID
        s = np.maximum(mean_abs.astype(np.float64), _EPS) ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        # (X/s) Q(sW) - XW = X ((Q(sW)/s) - W): compare in the original basis.
        tried.append((sum(_scaled_error(x, w, s, method, group) for w in sampled), a, s))
    base = tried[0][0]  # a = 0: plain rounding
    loss, alpha, s = min(tried, key=lambda t: t[0])
    return s, alpha, loss / base if base > 0 else 1.0


def awq_clip(rows: np.ndarray, w: np.ndarray, method: QuantFormat, group: int) -> np.ndarray:
    """AWQ's clipping search: per block and output channel, the fraction of amax that minimises
    the block's contribution to the output error on the calibration rows."""
    blocks = w.shape[0] // group
    # A block's error over the rows is d^T (X_b^T X_b) d per output channel: each block's Gram
    # [blocks, group, group] once, then one batched BLAS product per ratio (half the work of X_b d
    # with 256 rows, and a third of the elementwise work; np.einsum's loop was 3.5x slower still).
    x = rows.astype(np.float32).reshape(rows.shape[0], blocks, group).transpose(1, 0, 2)
    gram = np.matmul(x.transpose(0, 2, 1), x)
    best_err = np.full((blocks, w.shape[1]), np.inf, np.float32)
    best = np.ones((blocks, w.shape[1]), np.float32)
    fast = _integer_blocks(method)
    weight = _blocks(w, group)
    amax = _block_amax(weight)
    for ratio in AWQ_CLIP_RATIOS:
        clip = np.full((blocks, w.shape[1]), ratio, np.float32)
        if fast:  # the block maxima once, not per ratio
            delta = _fake_quant_blocks(weight, amax * clip, qmax(method.weights)).reshape(weight.shape)
        else:
            delta = fake_quant_weight(w, method, group, clip).reshape(weight.shape)
        delta -= weight
        err = (np.matmul(gram, delta) * delta).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, ratio, best)
    return best


def gptq_quantize(
    w: np.ndarray, gram: np.ndarray, group: int, dampening: float = GPTQ_DAMPENING, block: int = GPTQ_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ on a [in, out] weight (INT4, symmetric blocks of `group` input channels): input channels
    are rounded in order and each one's rounding error is spread over the channels not yet rounded,
    weighted by the inverse of the Hessian H = X^T X of the layer's input (`gram`; GPTQ's 2 X^T X
    up to a factor that cancels). A block's scale is taken when its first channel comes up, from
    the weights as the earlier channels' errors left them. Returns the INT4 codes [in, out] and the
    scales [in // group, out].

    With H^-1 = U^T U (U upper triangular), the error of channel i moves channel j > i by
    -U[i, j] / U[i, i] times it: channels within a batch of `block` are updated one by one, the rest
    once per batch (the same arithmetic, in few matrix products)."""
    rows, cols = w.shape
    h = gram.astype(np.float64).copy()
    work = w.astype(np.float64).copy()
    dead = np.diag(h) <= 0  # a channel calibration never saw non-zero: its weights do not matter
    h[dead, dead] = 1.0
    work[dead] = 0.0
    h[np.diag_indices(rows)] += dampening * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h)
    inverse = np.linalg.inv(lower)
    u = np.linalg.cholesky(inverse.T @ inverse).T  # H^-1 = U^T U
    high = qmax(DType.INT4)
    weight = np.diag(h)  # each input channel's share of the output error, for the clipping search
    codes = np.zeros((rows, cols), np.float64)
    scales = np.ones((rows // group, cols), np.float64)
    step = max(block // group, 1) * group  # a batch holds whole blocks: a block's scale sees every update
    for start in range(0, rows, step):
        end = min(start + step, rows)
        batch = work[start:end]  # a view: updated in place
        errors = np.zeros_like(batch)
        for i in range(end - start):
            row = start + i
            if row % group == 0:
                scales[row // group] = _gptq_scale(batch[i : i + group], weight[row : row + group], high)
            scale = scales[row // group]
            q = np.clip(np.rint(batch[i] / scale), -high - 1, high)
            codes[row] = q
            errors[i] = (batch[i] - q * scale) / u[row, row]
            batch[i + 1 :] -= np.outer(u[row, row + 1 : end], errors[i])
        work[end:] -= u[start:end, end:].T @ errors
    return codes.astype(DType.INT4.numpy), scales.astype(np.float32)


def _gptq_scale(block: np.ndarray, weight: np.ndarray, high: float) -> np.ndarray:
    """A block's scales per output channel: the fraction of its amax (AWQ_CLIP_RATIOS) whose rounding
    errs least on the block's rows, each row weighted by its input channel's energy (H's diagonal).
    SmolLM2's weights come from a 4-bit GGUF grid that symmetric absmax scales do not fit."""
    amax = np.abs(block).max(axis=0)
    best, best_err = amax, np.full(block.shape[1], np.inf)
    for ratio in AWQ_CLIP_RATIOS:
        scale = np.where(amax > 0, (amax * ratio / high).astype(np.float32), 1.0)
        err = weight[:, None] * np.square(np.clip(np.rint(block / scale), -high - 1, high) * scale - block)
        total = err.sum(axis=0)
        better = total < best_err
        best, best_err = np.where(better, scale, best), np.where(better, total, best_err)
    return np.where(amax > 0, best, 1.0)


def hessian_error(w: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """sum over the calibration tokens of ||x (approx - w)||^2 = tr(D^T H D): a layer's output error."""
    d = approx.astype(np.float64) - w.astype(np.float64)
    return float(np.einsum("ij,ij->", gram.astype(np.float64) @ d, d))


def output_error_ratio(stat: ActStats, weights: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> float:
    """sum ||X (approx - W)||^2 / sum ||X W||^2 over a group's layers: over every calibration token when
    the Gram matrix was summed, else over the sampled rows."""
    if stat.gram is not None:
        err = sum(hessian_error(w, a, stat.gram) for w, a in zip(weights, approx, strict=True))
        ref = sum(hessian_error(w, np.zeros_like(w), stat.gram) for w in weights)
    else:
        x = stat.sample.astype(np.float32)
        err = _output_error(x, weights, approx)
        ref = float(sum(np.square(x @ w).sum() for w in weights))
    return err / ref if ref > 0 else 0.0


class ActStats:
    """Per-channel statistics of one activation tensor over calibration, in bounded memory: the
    channels' max|x| and mean|x|, a uniform sample of at most `rows` tokens (for AWQ), and with
    `gram` the [C, C] sum of x^T x over every token (GPTQ's Hessian; float64, one per tensor)."""

    def __init__(self, channels: int, rows: int = 0, seed: int = 0, *, gram: bool = False) -> None:
        self.gram = np.zeros((channels, channels), np.float64) if gram else None
        self.amax = np.zeros(channels, np.float32)
        self._abs_sum = np.zeros(channels, np.float64)
        self.tokens = 0
        self._rows = rows
        self._rng = np.random.default_rng(seed)
        self._keys = np.zeros(0, np.float64)
        # Sampled rows keep the activations' own type (float16 in an fp16 graph: exact, and half the
        # memory of float32, 0.15 GB at the 1.1B shape); `sample` widens them.
        self._uniform = np.zeros((0, channels), np.float32)
        self._heavy = np.zeros((0, channels), np.float32)

    def update(self, x: np.ndarray) -> None:
        if self._rows and x.dtype == np.float16 and self.tokens == 0:
            self._uniform = self._uniform.astype(np.float16)
            self._heavy = self._heavy.astype(np.float16)
        kept = self._uniform.dtype
        flat = np.asarray(x, np.float32).reshape(-1, self.amax.shape[0])
        a = np.abs(flat)
        self.amax = np.maximum(self.amax, a.max(axis=0))
        self._abs_sum += a.sum(axis=0, dtype=np.float64)
        self.tokens += flat.shape[0]
        if self.gram is not None:  # the product in float32 (BLAS), summed over windows in float64
            self.gram += flat.T @ flat
        if self._rows:
            # Priority sampling: the tokens with the largest random keys are a uniform sample.
            keys = np.concatenate([self._keys, self._rng.random(flat.shape[0])])
            keep = np.argsort(keys)[-self._rows :]
            self._keys = keys[keep]
            self._uniform = np.concatenate([self._uniform, flat.astype(kept)])[keep]
            # The largest tokens too (attention sinks' massive activations are rare and decisive):
            # a search on the uniform rows alone would clip them away.
            rows = np.concatenate([self._heavy, flat.astype(kept)])
            self._heavy = rows[np.argsort(np.abs(rows).max(axis=1))[-max(self._rows // 8, 1) :]]

    @property
    def sample(self) -> np.ndarray:
        """The rows searches run on (float32): a uniform sample plus the heaviest tokens seen."""
        return np.concatenate([self._uniform, self._heavy]).astype(np.float32)

    @property
    def mean_abs(self) -> np.ndarray:
        return (self._abs_sum / max(self.tokens, 1)).astype(np.float32)
