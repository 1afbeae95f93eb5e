"""What tests/test_pp.py runs in each stage's process: importing it loads no test module (the rank
harness spawns its processes, and each imports the task's module)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate_ids

if TYPE_CHECKING:
    from llm2trt.backends.onnxruntime.ranks import RankContext


def greedy_batches(
    rank: RankContext, batches: list[list[list[int]]], new: int, capacity: int, pad_id: int
) -> list[list[list[int]]]:
    """Greedy new ids of each batch of prompts, a fresh session for each: several batches for the price
    of one start of the stages' processes."""
    generation = rank.manifest.generation
    eos = generation.eos_token_ids if generation is not None else []
    rows = []
    for prompts in batches:
        session = rank.session(rank.manifest.graph(), capacity, pad_id)
        rows.append(generate_ids(session, prompts, Sampling(new), eos)[0])
    return rows
