"""The runner registry: compare uses whatever is registered, by name."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

from llm2trt.backends.base import RunnerContext
from llm2trt.backends.registry import BACKENDS as RUNNERS
from llm2trt.backends.registry import register_runner
from tests.conftest import run_cli, run_json


class ScaledRunner(OnnxrtRunner):  # type: ignore[misc]
    """ONNX Runtime with every output scaled: a runner compare cannot mistake for the real one."""

    calls: ClassVar[list[str]] = []

    def __init__(self, ctx: RunnerContext, factor: float) -> None:
        super().__init__(SessionFromOnnx(str(ctx.onnx_path()), providers=["cpu"]), name="scaled")
        self.factor = factor

    def infer_impl(self, feed_dict: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> OrderedDict[str, Any]:
        ScaledRunner.calls.append(self.name)
        out = super().infer_impl(feed_dict, *args, **kwargs)
        return OrderedDict((k, np.asarray(v) * self.factor) for k, v in out.items())


@pytest.fixture()
def scaled() -> Iterator[None]:
    def factory(factor: float) -> Any:
        return lambda ctx: ScaledRunner(ctx, factor)

    register_runner("ort-scaled", factory(1.5))
    register_runner("ort-same", factory(1.0))
    ScaledRunner.calls = []
    yield
    RUNNERS.unregister("ort-scaled")
    RUNNERS.unregister("ort-same")


def test_a_registered_runner_is_used_by_compare(scaled: None, artifacts: dict[str, Path]) -> None:
    code, same = run_json("compare", artifacts["tiny:gpt2"], "--runners", "torch,ort-same", "-q")
    assert code == 0 and same["passed"] and same["runners"] == ["torch", "ort-same"]
    assert same["results"][0]["runner"] == "ort-same" and same["main_max_rel_err"] < 1e-5
    code, scaled_result = run_json("compare", artifacts["tiny:gpt2"], "--runners", "torch,ort-scaled", "-q")
    assert code == 1 and scaled_result["first_breach"]["runner"] == "ort-scaled"
    assert abs(scaled_result["main_max_rel_err"] - 0.5) < 1e-4  # |1.5 x - x| / |x|
    assert ScaledRunner.calls == ["ort-same", "ort-scaled"]
    # Unknown names list what is registered, the test's own runners included.
    result = run_cli("compare", artifacts["tiny:gpt2"], "--runners", "torch,nope")
    assert result.exit_code == 2 and "torch, ort, trt, ort-scaled, ort-same" in result.stderr


def test_runner_context_resolves_the_graph(artifacts: dict[str, Path]) -> None:
    from llm2trt.core.manifest import Manifest

    manifest = Manifest.read(artifacts["tiny:bert"])
    ctx = RunnerContext(artifacts["tiny:bert"], manifest, manifest.graph())
    assert ctx.onnx_path() == artifacts["tiny:bert"] / "model.onnx"
    assert set(RUNNERS.names()) >= {"torch", "ort", "trt"}
