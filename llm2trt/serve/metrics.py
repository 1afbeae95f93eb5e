"""The server's counters, gauges and latency histograms in Prometheus' text exposition format
(version 0.0.4): what `/metrics` answers. Updated by the engine thread, read by the server; one lock."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Seconds. Time to first token spans queueing and prefill; inter-token latency a decode step or two.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


_HELP = {
    "llm2trt_requests_waiting": ("gauge", "Requests queued for admission."),
    "llm2trt_requests_running": ("gauge", "Requests in the running batch."),
    "llm2trt_kv_blocks_in_use": ("gauge", "KV-cache blocks holding entries."),
    "llm2trt_kv_blocks_reserved": ("gauge", "KV-cache blocks promised to admitted requests."),
    "llm2trt_kv_blocks_total": ("gauge", "KV-cache blocks in the pool."),
    "llm2trt_requests_total": ("counter", "Finished requests, by why they finished."),
    "llm2trt_requests_rejected_total": ("counter", "Requests answered with an error before running, by status."),
    "llm2trt_prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "llm2trt_generation_tokens_total": ("counter", "Tokens generated."),
    "llm2trt_engine_steps_total": ("counter", "Model calls of the engine loop."),
    "llm2trt_time_to_first_token_seconds": ("histogram", "From arrival to the first token."),
    "llm2trt_inter_token_latency_seconds": ("histogram", "Between two tokens of one request."),
    "llm2trt_request_latency_seconds": ("histogram", "From arrival to the last token."),
}


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
        self.gauges: Callable[[], dict[str, int]] = dict

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def reject(self, status: int) -> None:
        with self.lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def render(self) -> str:
        with self.lock:
            values: dict[str, list[str]] = {name: [f"{name} {value}"] for name, value in self.gauges().items()}
            values["llm2trt_requests_total"] = [
                f'llm2trt_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())
            ]
            values["llm2trt_requests_rejected_total"] = [
                f'llm2trt_requests_rejected_total{{status="{k}"}} {v}' for k, v in sorted(self.rejected.items())
            ]
            values["llm2trt_prompt_tokens_total"] = [f"llm2trt_prompt_tokens_total {self.prompt_tokens}"]
            values["llm2trt_generation_tokens_total"] = [f"llm2trt_generation_tokens_total {self.generation_tokens}"]
            values["llm2trt_engine_steps_total"] = [f"llm2trt_engine_steps_total {self.steps}"]
            values["llm2trt_time_to_first_token_seconds"] = self.ttft.lines("llm2trt_time_to_first_token_seconds")
            values["llm2trt_inter_token_latency_seconds"] = self.itl.lines("llm2trt_inter_token_latency_seconds")
            values["llm2trt_request_latency_seconds"] = self.e2e.lines("llm2trt_request_latency_seconds")
        out = []
        for name, (kind, text) in _HELP.items():
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *values.get(name, [])]
        return "\n".join(out) + "\n"
