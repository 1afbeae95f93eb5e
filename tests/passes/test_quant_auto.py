"""--quant auto: the plan's arithmetic, its search against a perplexity the estimate misjudges, the
mixed graph on tiny:gemma3 (whose INT4 at group 16 costs perplexity and INT8 does not) measured again from the
written artifact, the built-in calibration text, and bad requests."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from llm2trt.core.dtypes import DType
from llm2trt.passes.qdq import PLAN_ROUNDS, _Options, _PlanSearch
from llm2trt.passes.quant_methods import auto
from tests.conftest import CC, assert_clean_failure, run_cli

CALIB = Path(__file__).resolve().parents[1] / "data" / "text" / "calib.txt"
INT4, INT8, KEPT = (*auto.CANDIDATES, auto.KEPT)


def synthetic(groups: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Groups whose INT4 error grows with their index, INT8 100x smaller; bytes 1 : 2 : 4."""
    errors = {f"g{i}": {INT4: 0.01 * (i + 1), INT8: 0.0001 * (i + 1)} for i in range(groups)}
    sizes = {f"g{i}": {INT4: 100, INT8: 200, KEPT: 400} for i in range(groups)}
    return errors, sizes


def test_plan_upgrades_the_most_loss_per_byte_first() -> None:
    errors, sizes = synthetic(6)
    k = {INT4: 1.0, INT8: 1.0}
    everything4 = auto.estimate(dict.fromkeys(errors, INT4), errors, k)  # 0.21
    choice = auto.plan(errors, sizes, k, 0.102, dict.fromkeys(errors, INT4))
    # The largest errors go to INT8 first (same bytes each): g5 and g4 leave 0.10 + 0.0011 of INT8.
    assert choice == {"g0": INT4, "g1": INT4, "g2": INT4, "g3": INT4, "g4": INT8, "g5": INT8}
    assert auto.estimate(choice, errors, k) <= 0.102 < everything4
    # A budget INT8 cannot meet keeps groups, the worst INT8 first.
    tight = auto.plan(errors, sizes, k, 0.0004, dict.fromkeys(errors, INT4))
    assert auto.estimate(tight, errors, k) <= 0.0004
    assert tight["g5"] == KEPT and tight["g0"] == INT8
    assert auto.budget_nll(1.0) == pytest.approx(math.log(1.01)) and auto.increase(math.log(1.03)) == pytest.approx(3)


class _Measured(_PlanSearch):
    """The search with a perplexity that is not the estimate: group i's INT4 costs (i + 1)^2 times
    its error, INT8 1x: the estimate (one coefficient per candidate) is wrong per group."""

    def __init__(self, errors: dict[str, dict[str, float]], sizes: dict[str, dict[str, int]], allowed: float) -> None:
        super().__init__(lambda _w: 0.0, _Options({}, errors, sizes), [], lambda c: c, allowed)

    def measure(self, choice: dict[str, str], what: str) -> float:
        cost = 0.0
        for group, c in choice.items():
            i = int(group[1:])
            cost += 0.0 if c == KEPT else self.options.errors[group][c] * ((i + 1) ** 2 if c == INT4 else 1)
        self.measurements.append(type(self.measurements[0])(what, cost, auto.increase(cost)))
        return cost


@pytest.mark.parametrize(("allowed", "int4", "kept"), [(0.5, 3, 0), (0.2, 2, 0), (0.05, 1, 0), (0.001, 0, 2)])
def test_the_search_meets_the_measured_budget_where_the_estimate_misjudges(
    allowed: float, int4: int, kept: int
) -> None:
    errors, sizes = synthetic(6)
    search = _Measured(errors, sizes, allowed)
    choice, _estimated, measured = search.run()
    assert measured <= allowed
    assert search.measure(choice, "check") == pytest.approx(measured)
    assert len(search.measurements) <= 3 + PLAN_ROUNDS + 1  # high precision, two "everything", the rounds
    # Group i's INT4 costs 0.01 (i + 1)^3: the cheapest plan within budget has this many INT4 groups (the
    # smallest errors), where the estimate alone (INT4 at 21x its error for every group) planned fewer.
    counts = Counter(choice.values())
    assert (counts[INT4], counts[KEPT]) == (int4, kept), choice
    assert all(choice[f"g{i}"] == INT4 for i in range(int4))


def test_mixed_graph_on_tiny_gemma3_keeps_its_budget(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from llm2trt.backends.decoder import open_session
    from llm2trt.backends.onnxruntime.decoder import ort_executor
    from llm2trt.core.manifest import Manifest
    from llm2trt.core.numerics import window_nll

    source, out, budget = artifacts["tiny:gemma3"], tmp_path / "auto", 0.1
    args = ["--quant", "auto", "--max-ppl-increase", str(budget), "--group-size", "16"]
    result = run_cli("optimize", source, "-o", out, *args, "--calib", CALIB, "--calib-samples", "2", "-q")
    assert result.exit_code == 0, result.stderr
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    plan = quant["plan"]
    # Measured on this model: everything INT4 +0.18%, everything INT8 -0.02%: a mix of the two.
    assert plan["counts"][INT4] > 0 and plan["counts"][INT8] > 0 and sum(plan["counts"].values()) == 8
    assert plan["measured"] <= budget and plan["held_out"] and plan["windows"] == 16
    assert plan["weight_bytes"] < plan["weight_bytes_fp16"] / 2
    # The graph: INT4 blocks (axis 0) for the INT4 groups' layers, INT8 per channel (axis 1) for the rest.
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    kinds = Counter()
    for node in (n for n in proto.graph.node if n.op_type == "DequantizeLinear"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kinds[DType.parse(inits[node.input[0]].dtype), attrs["axis"]] += 1
    layers = {INT4: 0, INT8: 0}
    for first, c in plan["groups"].items():
        layers[c] += 3 if first.endswith("q_proj") else 2 if first.endswith("gate_proj") else 1
    assert kinds == Counter({(DType.INT4, 0): layers[INT4], (DType.INT8, 1): layers[INT8]})
    assert len(quant["quantized"]) == 14 and set(quant["kept"]) == {"lm_head"}
    # Measured again from the written graph against the unquantized one, on the same windows: the
    # windows after the two calibration ones (bytes as ids, windows of the model's 256 positions).
    manifest = Manifest.read(source)
    vocab = int(manifest.model_config["vocab_size"])
    ids = [b % vocab for b in CALIB.read_bytes()]
    windows = [ids[i : i + 256] for i in range(0, len(ids), 256)][2:18]

    def nll(path: Path) -> float:
        m = Manifest.read(path)
        session = open_session(m.graph(), ort_executor(str(m.onnx_path(path, m.graph().name))), capacity=256)
        return sum(window_nll(session.prompt_logits(w), w) for w in windows) / sum(len(w) - 1 for w in windows)

    increase = auto.increase(nll(out) - nll(source))
    assert increase == pytest.approx(plan["measured"], abs=1e-3) and increase <= budget
    # TensorRT-RTX builds the mix: its INT4 and INT8 matrix multiplies as the plan's layers.
    built = run_cli("build", out, "-o", tmp_path / "engine", *CC, "-q")
    assert built.exit_code == 0, built.stderr
    info = json.loads((tmp_path / "engine" / "build.json").read_text())
    assert info["matmul_precisions"]["fp32 x int4"] == layers[INT4]
    assert info["matmul_precisions"]["fp32 x int8"] == layers[INT8]
    assert info["unfused_qdq"] == []


def test_calibrating_methods_default_to_the_built_in_text(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from llm2trt.optimize.calibrate import default_text

    text = default_text()
    assert text.name == "calib_default.txt" and text.stat().st_size > 100_000
    out = tmp_path / "gptq"
    args = ["--quant", "int4-gptq", "--group-size", "16", "--calib-samples", "1"]
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    calibration = json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]
    assert calibration["text"] == "calib_default.txt" and calibration["samples"] == 1
    # 256 tokens (a window of the tiny model's positions) are fewer than GPTQ's scales need.
    assert "int4-gptq calibrates on 256 tokens of calib_default.txt" in result.stderr
    # The evaluation texts are not calibration material.
    data = Path(__file__).resolve().parents[1] / "data" / "text"
    content = text.read_text()
    for held in ("eval.txt", "heldout.txt"):
        assert (data / held).read_text()[1000:1200] not in content


def test_bad_auto_requests_fail_cleanly(artifacts: dict[str, Path], tmp_path: Path) -> None:
    llama, out = artifacts["tiny:llama"], tmp_path / "out"
    cases = [
        (["--max-ppl-increase", "1"], "--max-ppl-increase goes with --quant auto"),
        (["--quant", "int8-wo", "--max-ppl-increase", "1"], "--max-ppl-increase is the budget of --quant auto"),
        (["--quant", "auto", "--max-ppl-increase", "-1"], "--max-ppl-increase is a percentage > 0 (got -1.0)"),
        (["--quant", "auto", "--keep-sensitive", "2"], "--quant auto chooses what to keep itself"),
    ]
    for args, fragment in cases:
        assert_clean_failure(run_cli("optimize", llama, "-o", out, *args), fragment, out)
    bert = run_cli("optimize", artifacts["tiny:bert"], "-o", out, "--quant", "auto")
    assert_clean_failure(bert, "needs a decoder artifact", out)


def test_plan_record_reads_back(artifacts: dict[str, Path]) -> None:
    from llm2trt.core.quant import AutoPlan, PlanMeasurement

    plan = AutoPlan(
        1.0, [INT4, INT8], {"a": INT4}, {INT4: 1, INT8: 0, KEPT: 0}, 10, 40, 0.5, 0.4, 4, True,
        [PlanMeasurement("high precision", 2.0, 0.0)], {"a": {INT4: 0.01, INT8: 0.0001}},
    )  # fmt: skip
    assert AutoPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert f"1 {INT4}, 0 {INT8}, 0 kept" in plan.render()
