"""In-flight batching: requests join and leave the running batch at every step.

The scheduler owns the waiting queue, the running batch and the KV pool; `step` is one turn of the
loop: admit what the pool can promise blocks to, decode one token for every running request that
has its prompt in the cache (one model call), then prefill new prompts within a token budget (short
fresh prompts together in one call, a long prompt a chunk at a time, so it never holds up the
others' next token for more than one chunk). Each request picks its tokens with its own sampling
and stops at EOS, `max_tokens` or a stop string; its blocks go back the moment it ends.

The engine runs the scheduler on its own thread (ONNX Runtime releases the GIL while it computes,
so the server's event loop keeps answering) and takes submissions and cancellations from any thread.
A model call that fails is retried row by row: a request whose own row fails ends with an error,
the others go on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llm2trt.backends.decoder import check_ids
from llm2trt.core.errors import InputError, first_line
from llm2trt.core.log import plural
from llm2trt.core.lora import NO_ADAPTER
from llm2trt.core.sampling import Sampling
from llm2trt.serve.blocks import BlockTable
from llm2trt.serve.metrics import Metrics
from llm2trt.serve.model import Loaded, PagedModel, Row
from llm2trt.serve.text import TextStream

logger = logging.getLogger(__name__)


class Busy(Exception):
    """The server cannot take the request now: its queue is full (429), or it is stopping (503)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# A generated token's log-probability under the model (before temperature) and the likeliest
# alternatives: (token, logprob, ((token, logprob), ...)).
TokenLogprob = tuple[int, float | None, tuple[tuple[int, float], ...]]  # None: a prompt's first token


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    row = logits.astype(np.float64)
    peak = row.max()
    normal = row - (peak + np.log(np.exp(row - peak).sum()))
    best = np.argpartition(-normal, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
    best = best[np.argsort(-normal[best], kind="stable")]
    return token, float(normal[token]), tuple((int(i), float(normal[i])) for i in best)


@dataclass(frozen=True)
class Event:
    """What a request's client is told after a step: new tokens and their text, and at the end why it ended."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # with the first token, where the request echoes


@dataclass
class Request:
    id: str
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[Event], None]
    stops: tuple[str, ...] = ()
    slot: int = NO_ADAPTER  # its LoRA adapter's slot
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    echo: bool = False  # and the prompt's tokens' too (with `logprobs`)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)
    carry: np.ndarray | None = None  # the logits of the last prompt position fed (they score the next)
    arrived: float = field(default_factory=time.perf_counter)
    # progress
    table: BlockTable | None = None
    fed: int = 0  # prompt tokens in the cache
    new: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    finish: str | None = None
    text: TextStream | None = None
    pick: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.prompt)


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64  # requests in the running batch
    chunk_tokens: int = 256  # prompt tokens prefilled per step
    max_queue: int = 1024  # requests waiting beyond the running batch


class Scheduler:
    def __init__(self, loaded: Loaded, limits: Limits, metrics: Metrics) -> None:
        self.loaded, self.model, self.limits, self.metrics = loaded, loaded.model, limits, metrics
        self.pool = loaded.model.pool
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.eos = set(loaded.eos)

    # -- admission ---------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], sampling: Sampling) -> None:
        """Refuse what can never run: an empty prompt, unknown ids, more positions than the model or
        the whole pool holds."""
        if not prompt:
            raise InputError("the prompt has no tokens")
        check_ids(self.loaded.manifest, [list(prompt)])
        need = len(prompt) + sampling.max_new_tokens
        if need > self.loaded.max_positions:
            raise InputError(
                f"{plural(len(prompt), 'prompt token')} plus max_tokens {sampling.max_new_tokens} need {need} "
                f"positions; this server holds {self.loaded.max_positions} per request"
            )

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_batch:
            request = self.waiting[0]
            positions = len(request.prompt) + request.sampling.max_new_tokens
            if not self.pool.can_reserve(positions):
                return  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            request.table = self.pool.reserve(positions)
            request.pick = request.sampling.picker()
            request.text = TextStream(self.loaded.tokenizer, request.stops)
            self.running.append(request)

    # -- the loop's turn ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        self._admit()
        decoding = [r for r in self.running if r.prefilled and r.finish is None]
        if decoding:
            self._call(decoding, [[r.new[-1]] for r in decoding])
        self._prefill()
        self._sweep()

    def _prefill(self) -> None:
        pending = [r for r in self.running if not r.prefilled and r.finish is None]
        if not pending:
            return
        budget, first = self.limits.chunk_tokens, pending[0]
        if first.fed or len(first.prompt) > budget:  # a long prompt: one chunk of it alone
            chunk = first.prompt[first.fed : first.fed + budget]
            self._call([first], [chunk])
            return
        batch: list[Request] = []
        for request in pending:
            if request.fed or len(request.prompt) > budget:
                break
            batch.append(request)
            budget -= len(request.prompt)
        self._call(batch, [r.prompt for r in batch])

    def _call(self, requests: list[Request], tokens: list[list[int]]) -> None:
        """One model call; on failure each row alone, and a row that fails alone fails its request."""
        try:
            rows = [Row(r.table, t, r.slot) for r, t in zip(requests, tokens, strict=True)]  # type: ignore[arg-type]
            scored = any(r.echo and r.logprobs is not None and not r.prefilled for r in requests)
            everywhere = self.model.step(rows, every_position=True) if scored else None
            logits = everywhere[:, -1] if everywhere is not None else self.model.step(rows)
        except Exception as exc:
            if len(requests) == 1:
                logger.warning("request %s failed in the model: %s", requests[0].id, first_line(exc))
                self._end(requests[0], "error", f"the model failed on this request: {first_line(exc)}")
                return
            for request, row_tokens in zip(requests, tokens, strict=True):
                self._call([request], [row_tokens])
            return
        with self.metrics.lock:
            self.metrics.steps += 1
        for i, (request, row_tokens, row_logits) in enumerate(zip(requests, tokens, logits, strict=True)):
            if request.prefilled:
                self._take(request, row_logits)
                continue
            if everywhere is not None and request.echo and request.logprobs is not None:
                self._score_prompt(request, row_tokens, everywhere[i, everywhere.shape[1] - len(row_tokens) :])
            request.fed += len(row_tokens)
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(row_tokens)
            if request.fed == len(request.prompt):  # its whole prompt is in: the first token
                self._take(request, row_logits)

    def _score_prompt(self, request: Request, chunk: list[int], logits: np.ndarray) -> None:
        """Each prompt token's log-probability given the tokens before it (the first has none):
        from the previous chunk's last position, then this chunk's own."""
        top = request.logprobs or 0
        for j, token in enumerate(chunk):
            before = request.carry if j == 0 else logits[j - 1]
            score = token_logprob(before, token, top) if before is not None else (token, None, ())
            request.prompt_scores.append(score)
        request.carry = logits[-1]

    def _take(self, request: Request, logits: np.ndarray) -> None:
        """The request's next token from its logits: told to its client, and the end where it is one."""
        pick, text = request.pick, request.text
        if pick is None or text is None:
            raise RuntimeError(f"request {request.id} was not admitted")
        token = int(pick(logits[None])[0])
        request.new.append(token)
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.generation_tokens += 1
            if len(request.new) == 1:
                self.metrics.ttft.observe(now - request.arrived)
            else:
                self.metrics.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        eos = token in self.eos
        length = len(request.new) >= request.sampling.max_new_tokens
        piece = text.add(token, last=eos or length) if not eos else text.flush()
        finish = "stop" if eos or text.stopped else "length" if length else None
        scores = () if request.logprobs is None else (token_logprob(logits, token, request.logprobs),)
        prompt = tuple(request.prompt_scores) if len(request.new) == 1 else ()
        event = Event((token,), piece, finish, None, len(request.prompt), len(request.new), scores, prompt)
        request.sink(event)
        if finish is not None:
            request.finish = finish
            self._release(request)

    def _end(self, request: Request, finish: str, error: str | None = None) -> None:
        request.finish = finish
        request.sink(Event((), "", finish, error, len(request.prompt), len(request.new)))
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.table is not None:
            self.pool.release(request.table)
            request.table = None
        self.metrics.finish(request.finish or "cancelled")
        with self.metrics.lock:
            self.metrics.e2e.observe(time.perf_counter() - request.arrived)

    def _sweep(self) -> None:
        self.running = [r for r in self.running if r.finish is None]

    def cancel(self, ids: set[str]) -> None:
        """End the named requests now (their blocks back in the pool); unknown ids are ignored."""
        for request in [r for r in self.running if r.id in ids and r.finish is None]:
            self._end(request, "cancelled")
        kept: collections.deque[Request] = collections.deque()
        for request in self.waiting:
            if request.id in ids:
                request.finish = "cancelled"
                request.sink(Event((), "", "cancelled", None, len(request.prompt), 0))
                self.metrics.finish("cancelled")
            else:
                kept.append(request)
        self.waiting = kept
        self._sweep()


class Engine:
    """The scheduler on its own thread; `submit` and `cancel` from any thread."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: set[str] = set()
        self._stopping = False
        self.accepting = True
        self.failure: str | None = None
        scheduler.metrics.gauges = self.gauges
        self._thread = threading.Thread(target=self._loop, name="llm2trt-engine", daemon=True)
        self._thread.start()

    @property
    def model(self) -> PagedModel:
        return self.scheduler.model

    def gauges(self) -> dict[str, int]:
        pool = self.scheduler.pool
        return {
            "llm2trt_requests_waiting": len(self.scheduler.waiting) + len(self._inbox),
            "llm2trt_requests_running": len(self.scheduler.running),
            "llm2trt_kv_blocks_in_use": pool.in_use,
            "llm2trt_kv_blocks_reserved": pool.reserved,
            "llm2trt_kv_blocks_total": pool.total,
        }

    def submit(self, request: Request) -> None:
        """Queue a request (InputError: it can never run; Busy: not now)."""
        self.scheduler.check(request.prompt, request.sampling)
        with self._cond:
            if self.failure is not None:
                raise Busy(f"the engine stopped: {self.failure}", 503)
            if not self.accepting:
                raise Busy("the server is shutting down", 503)
            if len(self._inbox) + len(self.scheduler.waiting) >= self.scheduler.limits.max_queue:
                raise Busy(f"the server's queue is full ({self.scheduler.limits.max_queue} requests)", 429)
            self._inbox.append(request)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self.scheduler.busy or self._stopping):
                        self._cond.wait()
                    if self._stopping and not (self._inbox or self.scheduler.busy):
                        return
                    self.scheduler.waiting.extend(self._inbox)
                    self._inbox.clear()
                    cancels, self._cancels = self._cancels, set()
                if cancels:
                    self.scheduler.cancel(cancels)
                if self.scheduler.busy:
                    self.scheduler.step()
        except Exception as exc:  # a bug of ours: every request still ends, with the reason
            logger.exception("the engine loop stopped")
            self.failure = first_line(exc)
            for request in [*self.scheduler.running, *self.scheduler.waiting, *self._inbox]:
                if request.finish is None:
                    request.finish = "error"
                    request.sink(Event((), "", "error", f"the engine stopped: {self.failure}"))

    def stop_accepting(self) -> None:
        """New requests are refused (503) from now on; what runs or waits goes on."""
        with self._cond:
            self.accepting = False

    def drain(self, deadline: float) -> int:
        """Stop taking requests, let the running ones finish until `deadline` (perf_counter seconds),
        cancel what is left and stop the loop; how many were cancelled."""
        self.stop_accepting()
        while time.perf_counter() < deadline and not self.idle() and self._thread.is_alive():
            time.sleep(0.01)
        with self._cond:
            left = {r.id for r in [*self.scheduler.running, *self.scheduler.waiting, *self._inbox] if r.finish is None}
            self._cancels |= left
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        return len(left)

    def idle(self) -> bool:
        with self._cond:
            return not (self._inbox or self.scheduler.busy)
