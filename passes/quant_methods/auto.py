"""auto: a precision per layer group within a perplexity budget (`--quant auto --max-ppl-increase P`).

The pass (`llm2trt.passes.qdq.QuantPass`) measures, per group and candidate, the relative output error
its quantized weights make on the calibration tokens, and the perplexity of the calibration text's
scoring windows with everything at one candidate; `plan` turns those into a choice per group, and the
pass measures the choice and asks again with corrected coefficients while it is over budget.

The estimate: a group's share of the log-perplexity increase is k_c * e (e its relative squared output
error under candidate c), with k_c fitted so that everything at c predicts what was measured. Noise
from different layers adds in energy to first order, so squared errors add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.quant import QuantRequest
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.passes.quant_methods.method import MIN_CALIB_TOKENS, QuantMethod

KEPT = "kept"  # a group left in high precision
# The cheapest first. INT4 by GPTQ: on SmolLM2-135M at group 128 it lost less perplexity than AWQ on
# both texts (docs/quantization.md) in less than half AWQ's time, and it changes no other weight.
CANDIDATES = ("int4-gptq", "int8-wo")


class AutoMixed(QuantMethod):
    """Not one method but a plan over CANDIDATES (and high precision), per layer group."""

    name = "auto"
    weights = DType.INT4  # the cheapest candidate's; the plan says what each group got
    blockwise = True
    needs_hessian = True  # GPTQ's, the INT4 candidate
    mixed = True  # calibrates; the pass applies a smoothing candidate's migration to every group (exact)
    summary = "a precision per layer group (INT4 GPTQ, INT8, kept) within --max-ppl-increase"
    min_calib_tokens = MIN_CALIB_TOKENS
    tolerance = TolerancePolicy(name, 1.0, 0.85)
    candidates = CANDIDATES

    @property
    def granularity(self) -> str:
        return "mixed"

    def check(self, request: QuantRequest) -> None:
        if request.keep_sensitive:
            raise InputError("--keep-sensitive goes with int8-sq/fp8; --quant auto chooses what to keep itself")
        if request.alpha is not None:
            raise InputError("--alpha is SmoothQuant's strength; --quant auto does not migrate scales")


def budget_nll(percent: float) -> float:
    """A perplexity increase in percent as an increase of the mean negative log-likelihood."""
    return math.log1p(percent / 100)


def increase(nll: float) -> float:
    """The inverse: percent."""
    return math.expm1(nll) * 100


def estimate(choice: Mapping[str, str], errors: Mapping[str, Mapping[str, float]], k: Mapping[str, float]) -> float:
    """The predicted log-perplexity increase of a choice (group -> candidate or KEPT)."""
    return sum(k[c] * errors[g][c] for g, c in choice.items() if c != KEPT)


def weight_bytes(choice: Mapping[str, str], sizes: Mapping[str, Mapping[str, int]]) -> int:
    return sum(sizes[g][c] for g, c in choice.items())


def plan(
    errors: Mapping[str, Mapping[str, float]],
    sizes: Mapping[str, Mapping[str, int]],
    k: Mapping[str, float],
    budget: float,
    start: Mapping[str, str],
    order: tuple[str, ...] = CANDIDATES,
) -> dict[str, str]:
    """From `start`, upgrade groups (to a more precise candidate, or KEPT) until the estimate is within
    `budget` (log-perplexity): each time the upgrade removing the most estimated loss per byte added.
    `sizes`: bytes of each group under each candidate and KEPT."""
    levels = [*order, KEPT]
    choice = dict(start)

    def loss(group: str, c: str) -> float:
        return 0.0 if c == KEPT else k[c] * errors[group][c]

    total = estimate(choice, errors, k)
    while total > budget:
        best: tuple[float, str, str] | None = None
        for group, current in choice.items():
            for better in levels[levels.index(current) + 1 :]:
                gain = loss(group, current) - loss(group, better)
                if gain <= 0:
                    continue
                ratio = gain / max(sizes[group][better] - sizes[group][current], 1)
                if best is None or ratio > best[0]:
                    best = (ratio, group, better)
        if best is None:
            break
        _, group, better = best
        total += loss(group, better) - loss(group, choice[group])
        choice[group] = better
    return choice


def refit(
    k: Mapping[str, float],
    choice: Mapping[str, str],
    errors: Mapping[str, Mapping[str, float]],
    measured: float,
    estimated: float,
) -> dict[str, float]:
    """The coefficients after a measurement over the estimate: scaled by measured / estimated, or where
    the estimate was 0 (every candidate in use measured free when alone), the excess given to the
    candidates in use in proportion to their errors."""
    if estimated > 0:
        return {c: v * max(measured / estimated, 1.0) for c, v in k.items()}
    used = {c: sum(errors[g][c] for g, chosen in choice.items() if chosen == c) for c in k}
    total = sum(used.values())
    return {c: (measured / total if total > 0 and used[c] > 0 else v) for c, v in k.items()}


def force_upgrade(
    choice: Mapping[str, str], errors: Mapping[str, Mapping[str, float]], order: tuple[str, ...] = CANDIDATES
) -> dict[str, str]:
    """One step up for the group erring most at its level, when the estimate sees nothing to gain but
    the measurement is over budget."""
    levels = [*order, KEPT]
    movable = [g for g, c in choice.items() if c != KEPT]
    out = dict(choice)
    if movable:
        worst = max(movable, key=lambda g: errors[g][choice[g]])
        out[worst] = levels[levels.index(choice[worst]) + 1]
    return out
