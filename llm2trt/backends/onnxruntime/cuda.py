"""Decoding on ONNX Runtime's CUDA provider with everything on the GPU.

For a fixed-size cache (`fixed` or `gqa` form) every decode step has the same shapes and the
same buffers, so the step is captured once as a CUDA graph and replayed (ONNX Runtime's
`enable_cuda_graph`). A gqa prefill is padded on the right to a bucket width (`prefill_width`) and
captured per (batch, bucket); a fixed-form prefill, whose shapes vary, runs uncaptured
(`gpu_graph_id` -1).
The inputs, the cache and the logits are torch tensors bound by address through IO binding;
the cache buffers are bound as both past and present, so the graph updates them in place.
Greedy decoding never leaves the GPU but for the picked ids: the between-step work (the pick,
the position and length counters) is a small torch CUDA graph of its own, ONNX Runtime runs on
torch's stream and is told not to synchronize at the end of a run, so the host only waits once a
step, when it copies the picked ids back (what a loop watching for EOS needs). The host's own
overhead then overlaps the GPU's work instead of adding to it.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from llm2trt.backends.decoder import DecoderSession
from llm2trt.core.errors import BackendError, InputError, first_line
from llm2trt.core.kv import SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from llm2trt.core.log import plural
from llm2trt.core.manifest import GraphSpec

log = logging.getLogger(__name__)
UNCAPTURED = "-1"  # ONNX Runtime's graph id for a run it must not capture; 0 is its own
PREFILL_GRAPH_IDS = 1_000_000  # prefill graphs: this + width * 1000 + batch (decode's id: the batch)
PREFILL_MIN_WIDTH = 16


def prefill_width(width: int, capacity: int) -> int:
    """The bucket a prefill of `width` tokens is padded to: 16, 24, 32, 48, 64, 96, ... (powers of
    two and 1.5x them, so at most half the compute is padding and there are ~2 log2(capacity)
    captured graphs per batch size), never past the cache's capacity."""
    bucket = PREFILL_MIN_WIDTH
    while bucket < width:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket // 3 * 4
    return min(bucket, capacity)


def greedy_pick(logits: Any) -> Any:
    """argmax over the last dim, keepdim, first index among ties (torch.argmax's rule), in two
    short reductions (groups of the vocabulary, then the groups' maxima): one reduction over a
    32,000-wide row ran ~10 µs on the H200, as long as a small GEMV."""
    import torch

    vocab = logits.shape[-1]
    group = next((g for g in (256, 128, 64) if vocab % g == 0 and vocab > g), None)
    if group is None:
        return torch.argmax(logits, dim=-1, keepdim=True)
    values, within = logits.unflatten(-1, (vocab // group, group)).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)  # the first group holding the maximum
    return best * group + within.gather(-1, best)


@dataclass
class _Buffers:
    """Device tensors bound to the decode step (fixed addresses for the captured graph)."""

    ids: Any
    positions: Any
    seqlens: Any | None
    total: Any | None
    logits: Any
    lengths: Any  # each row's valid length (int64), what the counters move on from
    cache: dict[str, Any] = field(default_factory=dict)
    picked: list[Any] = field(default_factory=list)  # two pinned host buffers the picks are copied to
    binding: Any = None  # the decode step's IO binding over these buffers
    advance: Any = None  # the captured between-step work (greedy pick, counters)
    graph_id: str = UNCAPTURED  # ONNX Runtime's captured graph of the decode step, one per batch size


F = TypeVar("F", bound=Callable[..., Any])


def _on_own_stream(method: F) -> F:
    """Run the method's torch work on the session's stream, the one ONNX Runtime runs on."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.torch.cuda.stream(self.stream):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class OrtCudaSession(DecoderSession):
    """A fixed-size-cache decoder on ONNX Runtime CUDA; `decode` replays a captured CUDA graph."""

    def __init__(
        self, graph: GraphSpec, onnx_path: str, capacity: int, pad_id: int = 0, cuda_graph: bool = True
    ) -> None:
        import torch

        if graph.kv_cache is None or not graph.kv_cache.traits.cuda_session:
            raise InputError("the CUDA-graph decoder needs a fixed-size cache: optimize with --kv-form fixed or gqa")
        super().__init__(graph, lambda feeds: {}, pad_id)
        self.torch = torch
        self.kv = graph.kv_cache
        self.capacity = capacity
        self.cuda_graph = cuda_graph
        # A stream of our own (the legacy default stream's handle is 0, which ONNX Runtime takes for
        # "none" and then runs on a stream of its own, unordered with torch's work).
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self.session = _session(onnx_path, self.stream.cuda_stream, cuda_graph)
        self.gqa = bool(graph.kv_cache.traits.counters)
        # Buffers by batch size: a captured graph replays fixed addresses, so each batch size keeps
        # its own buffers and its own graph id for the session's life.
        self.batches: dict[int, _Buffers] = {}
        self.prefills: dict[tuple[int, int], _Buffers] = {}  # by (batch, padded width), captured
        self.buffers: _Buffers | None = None
        self.options = {UNCAPTURED: _run_options(UNCAPTURED)}
        self.longest = 0  # the longest row's length, on the host (no sync to check capacity)

    # -- prefill: captured per padded width (gqa), else uncaptured at the prompts' width ---------

    @_on_own_stream
    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        torch = self.torch
        batch, width = len(prompts), max(len(p) for p in prompts)
        if width > self.capacity:
            raise InputError(f"a prompt of {plural(width, 'token')} does not fit the {self.capacity}-slot KV cache")
        self._allocate(batch)
        # GroupQueryAttention counts each row by seqlens_k, so rows may be padded on the right to a
        # bucket width whose prefill is a captured graph: host work per prefill is then one replay.
        padded = prefill_width(width, self.capacity) if self.cuda_graph and self.gqa else width
        p = self._prefill_buffers(batch, padded)
        ids = np.full((batch, padded), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        p.ids.copy_(torch.from_numpy(ids), non_blocking=False)
        lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.int64).to("cuda")
        if p.seqlens is not None:
            p.seqlens.copy_(lengths - 1)
        try:
            self._run(p.binding, p.graph_id)
        except BackendError as exc:
            if p.graph_id == UNCAPTURED:
                raise
            # Capturing this prefill failed (a kernel that syncs with the host, say): run this width
            # uncaptured from now on.
            log.warning("prefill at width %d is not capturable (%s): running it uncaptured", padded, exc)
            p.graph_id = UNCAPTURED
            self._run(p.binding, p.graph_id)
        self._live().lengths.copy_(lengths)
        self.longest = width
        last = p.logits[torch.arange(batch, device="cuda"), lengths - 1]
        return last.float().cpu().numpy()  # type: ignore[no-any-return]

    def _prefill_buffers(self, batch: int, width: int) -> _Buffers:
        """The prefill's inputs and logits for (batch, width): kept, with a graph id, where captured."""
        key = (batch, width)
        if key in self.prefills:
            return self.prefills[key]
        torch = self.torch
        p = _Buffers(
            ids=torch.empty((batch, width), dtype=torch.int64, device="cuda"),
            positions=torch.arange(width, device="cuda").expand(batch, width).contiguous(),
            seqlens=torch.zeros((batch,), dtype=torch.int32, device="cuda") if self.gqa else None,
            total=torch.tensor(width, dtype=torch.int32) if self.gqa else None,  # host scalar
            logits=torch.empty((batch, width, self._vocab()), dtype=self.logits_dtype.torch, device="cuda"),
            lengths=torch.zeros((batch,), dtype=torch.int64, device="cuda"),
        )
        feeds = {"input_ids": p.ids, "position_ids": p.positions}
        if self.gqa:
            feeds[SEQLENS_K] = p.seqlens
            feeds[TOTAL_SEQUENCE_LENGTH] = p.total
        p.binding = self._bind(feeds, p.logits)
        if self.cuda_graph and self.gqa:
            p.graph_id = str(PREFILL_GRAPH_IDS + width * 1000 + batch)
            self.options.setdefault(p.graph_id, _run_options(p.graph_id))
            self.prefills[key] = p
        return p

    # -- decode: one token per row, the captured graph -------------------------------------------

    @_on_own_stream
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        buffers = self._step(self.torch.as_tensor(tokens, device="cuda").reshape(-1, 1))
        return buffers.logits[:, -1].float().cpu().numpy()  # type: ignore[no-any-return]

    @_on_own_stream
    def _start_greedy(self, logits: np.ndarray) -> Any:
        """After `prefill`: load the greedy pick of its logits as the next input; the ids buffer."""
        b = self._live()
        b.ids.copy_(self.torch.as_tensor(np.argmax(logits, -1), device="cuda").reshape(-1, 1))
        self._load_counters(b)
        return b.ids

    def greedy_pipeline(self, logits: np.ndarray) -> Iterator[list[int]]:
        """Greedy ids, step after step, with one step run ahead: step k+1 is launched before the
        host waits for step k's ids. The host's own work per step (launching a captured graph of
        a few hundred nodes costs ~0.3 ms of CPU, measured on the H200) then overlaps the GPU's
        instead of adding to it. The ids come out in order; a consumer that stops (EOS) leaves one
        more step computed and unread. `logits` are the prefill's: their pick is the first input."""
        self._start_greedy(logits)
        pending: deque[tuple[Any, Any]] = deque()
        step = 0
        while True:
            pending.append(self._launch_greedy(step))
            step += 1
            if len(pending) == 2 or self.longest >= self.capacity:
                host, done = pending.popleft()
                done.synchronize()
                yield host.reshape(-1).tolist()
            if self.longest >= self.capacity and not pending:
                return

    @_on_own_stream
    def _launch_greedy(self, step: int) -> tuple[Any, Any]:
        """Enqueue one greedy step and the copy of its picks to a pinned host buffer."""
        b = self._live()
        if self.longest >= self.capacity:
            raise InputError(f"the {self.capacity}-slot KV cache is full")
        self._run(b.binding, b.graph_id)
        b.advance.replay()
        self.longest += 1
        host = b.picked[step % 2]
        host.copy_(b.ids, non_blocking=True)
        done = self.torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(self.stream)
        return host, done

    def _step(self, tokens: Any) -> _Buffers:
        b = self._live()
        if self.longest >= self.capacity:
            raise InputError(f"the {self.capacity}-slot KV cache is full")
        b.ids.copy_(tokens)
        self._load_counters(b)
        self._run(b.binding, b.graph_id)
        b.lengths += 1
        self.longest += 1
        return b

    def _load_counters(self, b: _Buffers) -> None:
        """The next token's position is each row's length; GroupQueryAttention counts it as seqlens_k."""
        b.positions.copy_(b.lengths.reshape(-1, 1))
        if b.seqlens is not None:
            b.seqlens.copy_(b.lengths.to(self.torch.int32))

    def _live(self) -> _Buffers:
        if self.buffers is None:
            raise InputError("decode before prefill")
        return self.buffers

    # -- plumbing -------------------------------------------------------------------------------

    def _vocab(self) -> int:
        dim = self.graph.outputs[0].shape[-1]
        if not isinstance(dim, int):
            raise BackendError("the logits' vocabulary dim is not static")
        return dim

    def _allocate(self, batch: int) -> None:
        """The decode step's buffers, once per batch size (the captured graph keeps their addresses)."""
        torch = self.torch
        if batch in self.batches:
            self.buffers = self.batches[batch]
            for tensor in self.buffers.cache.values():
                tensor.zero_()
            return
        shape = (batch, self.kv.num_kv_heads, self.capacity, self.kv.head_dim)
        cache = {name: torch.zeros(shape, dtype=self.cache_dtype.torch, device="cuda") for name in self.kv.past_names}
        self.buffers = _Buffers(
            ids=torch.zeros((batch, 1), dtype=torch.int64, device="cuda"),
            positions=torch.zeros((batch, 1), dtype=torch.int64, device="cuda"),
            seqlens=torch.zeros((batch,), dtype=torch.int32, device="cuda") if self.gqa else None,
            # A decode step sees the whole buffer: the lengths mask it, and the captured graph's
            # host scalar stays the same every step.
            total=torch.tensor(self.capacity, dtype=torch.int32) if self.gqa else None,
            logits=torch.empty((batch, 1, self._vocab()), dtype=self.logits_dtype.torch, device="cuda"),
            lengths=torch.zeros((batch,), dtype=torch.int64, device="cuda"),
            cache=cache,
            picked=[torch.zeros((batch, 1), dtype=torch.int64).pin_memory() for _ in range(2)],
        )
        feeds = {"input_ids": self.buffers.ids, "position_ids": self.buffers.positions}
        if self.gqa:
            feeds[SEQLENS_K] = self.buffers.seqlens
            feeds[TOTAL_SEQUENCE_LENGTH] = self.buffers.total
        self.buffers.binding = self._bind(feeds, self.buffers.logits)
        self.buffers.advance = self._capture_advance(self.buffers)
        self.buffers.graph_id = str(batch) if self.cuda_graph else UNCAPTURED
        self.options.setdefault(self.buffers.graph_id, _run_options(self.buffers.graph_id))
        self.batches[batch] = self.buffers

    def _capture_advance(self, b: _Buffers) -> Any:
        """The between-step work as one torch CUDA graph: pick, then move every counter on."""
        torch = self.torch

        def advance() -> None:
            b.ids.copy_(greedy_pick(b.logits[:, -1]))
            b.positions.add_(1)
            b.lengths.add_(1)
            if b.seqlens is not None:
                b.seqlens.add_(1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            advance()  # warm-up outside the capture (allocations, kernel loads)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            advance()
        return graph

    def _bind(self, feeds: dict[str, Any], logits: Any) -> Any:
        buffers = self._live()
        binding = self.session.io_binding()
        wanted = {i.name for i in self.session.get_inputs()}
        for name, tensor in feeds.items():
            if name in wanted:
                _bind(binding.bind_input, name, tensor)
        _bind(binding.bind_output, self.graph.main_output, logits)
        for past, present in zip(self.kv.past_names, self.kv.present_names, strict=True):
            buffer = buffers.cache[past]
            _bind(binding.bind_input, past, buffer)
            _bind(binding.bind_output, present, buffer)  # in place: present is past
        return binding

    def _run(self, binding: Any, graph_id: str) -> None:
        try:
            self.session.run_with_iobinding(binding, self.options[graph_id])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime CUDA failed: {first_line(exc)}") from None


def _run_options(graph_id: str) -> Any:
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    # No stream synchronization at the end of a run: ONNX Runtime works on torch's stream, so the
    # next torch op is ordered after it anyway, and the host waits only when it reads results.
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return options


def _bind(bind: Any, name: str, tensor: Any) -> None:
    device = "cpu" if tensor.device.type == "cpu" else "cuda"
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    bind(name, device, 0, dtype, tuple(tensor.shape), tensor.data_ptr())


def _register_kernels(options: Any, path: str) -> None:
    """llm2trt's CUDA kernels for the graph's `llm2trt` ops (built on first use); without them ONNX
    Runtime runs the ops' reference bodies, slower but the same numbers."""
    from llm2trt.plugins import ort_library as ort_kernels

    if not ort_kernels.graph_uses(path):
        return
    try:
        library = ort_kernels.library(ort_kernels.device_arch())
    except BackendError as exc:
        log.warning("%s: running the llm2trt ops' reference bodies instead", exc)
        return
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own exception types
        log.warning("ONNX Runtime cannot load %s (%s): running the llm2trt ops' reference bodies", library, exc)


def _session(path: str, stream: int, cuda_graph: bool) -> Any:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError("ONNX Runtime has no CUDA provider here: install onnxruntime-gpu (llm2trt[gpu])")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    _register_kernels(options, path)
    cuda = {"device_id": "0", "user_compute_stream": str(stream), "enable_cuda_graph": "1" if cuda_graph else "0"}
    try:
        return ort.InferenceSession(path, options, providers=[("CUDAExecutionProvider", cuda)])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"ONNX Runtime cannot load {path} on CUDA: {first_line(exc)}") from None
