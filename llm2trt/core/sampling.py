"""How the next token is picked from a row of logits: greedy, or temperature / top-k / top-p sampling
from a seeded generator. Shared by generate (a batch, one generator) and serve (one per request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.records import Record


@dataclass(frozen=True)
class Sampling(Record):
    """How the next token is picked: greedy at temperature 0."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise InputError("sampling needs --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")

    def picker(self) -> Callable[[np.ndarray], np.ndarray]:
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> np.ndarray:
            if self.temperature == 0:
                greedy: np.ndarray = np.argmax(logits, axis=-1).astype(np.int64)
                return greedy
            return np.array([self._sample(row, rng) for row in logits.astype(np.float64)], dtype=np.int64)

        return pick

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        logits = logits / self.temperature
        if self.top_k:
            cutoff = np.sort(logits)[-min(self.top_k, logits.size)]
            logits = np.where(logits < cutoff, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.top_p < 1:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < self.top_p  # the smallest set reaching top_p
            probs[order[~keep]] = 0
            probs /= probs.sum()
        return int(rng.choice(probs.size, p=probs))
