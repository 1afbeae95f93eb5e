"""The pipeline is assembled in one place from options; a pass receives configuration and data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from llm2trt.exporters import all_specs
from llm2trt.passes.core import GraphPass, Model, PassResult
from llm2trt.passes.fusions import FUSIONS, Fusion
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.pipeline import PIPELINE, PipelineOptions, assemble, register_entry
from tests.passes.test_core import _model

CLEANUP = ["constant_folding", "identity_elimination", "cast_elimination", "dead_node_elimination"]


def names(passes: Sequence[GraphPass]) -> list[str]:
    return [p.name for p in passes]


def test_default_pipeline_and_skipping_every_fusion() -> None:
    fusions = [f"fuse_{name.lower()}" for name in FUSIONS]
    assert names(assemble(PipelineOptions()).passes) == [*CLEANUP, "opset_upgrade", *fusions, "shape_inference"]
    none = assemble(PipelineOptions(skip_fusions=tuple(FUSIONS)))
    assert names(none.passes) == [*CLEANUP, "shape_inference"]  # no fused op, no opset upgrade


def test_configuration_reaches_a_built_in_pass() -> None:
    manager = assemble(PipelineOptions(settings={"opset_upgrade": {"target": 24}}))
    [upgrade] = [p for p in manager.passes if isinstance(p, OpsetUpgrade)]
    assert upgrade.target == 24


class ScaleInitializers(GraphPass):
    """A pass with configuration (`factor`) and data (`samples`): scales every initializer by
    factor * mean(samples), as a calibrated pass would use statistics."""

    name = "scale_initializers"
    runs_after: ClassVar[tuple[str, ...]] = ("constant_folding",)

    def __init__(self, factor: float, samples: list[float]) -> None:
        self.factor, self.samples = factor, samples

    def run(self, model: Model) -> PassResult:
        scale = self.factor * float(np.mean(self.samples))
        scaled = 0
        for tensor in model.graph.tensors().values():
            if hasattr(tensor, "values"):
                tensor.values = np.asarray(np.asarray(tensor.values) * scale, dtype=np.float32)
                scaled += 1
        return PassResult(modified=scaled > 0, counts={"scaled": scaled, "scale_x100": round(scale * 100)})


@pytest.fixture()
def calibrated_entry() -> Iterator[None]:
    def make(options: PipelineOptions) -> list[GraphPass]:
        if "samples" not in options.data:
            return []
        return [ScaleInitializers(options.setting("scale_initializers", "factor", 1.0), options.data["samples"])]

    register_entry("scale_initializers", 150, make)
    yield
    PIPELINE.unregister("scale_initializers")


def test_a_registered_pass_takes_configuration_and_data(calibrated_entry: Any) -> None:
    assert "scale_initializers" not in names(assemble(PipelineOptions()).passes)  # no data, no pass
    options = PipelineOptions(
        skip_fusions=tuple(FUSIONS), settings={"scale_initializers": {"factor": 2.0}}, data={"samples": [1.0, 2.0]}
    )
    manager = assemble(options)
    assert names(manager.passes) == [*CLEANUP, "scale_initializers", "shape_inference"]
    result = manager.run(Model.from_onnx(_model()))
    assert result.results["scale_initializers"].counts == {"scaled": 2, "scale_x100": 300}  # W and the folded 2 * 3


def test_fusion_registry_derives_ops_and_covers_every_spec() -> None:
    assert {name: f.ops for name, f in FUSIONS.items()} == {
        "LayerNorm": ("LayerNormalization",),
        "RMSNorm": ("RMSNormalization",),
        "Gelu": ("Gelu",),
        "RoPE": ("RotaryEmbedding",),
        "Attention": ("Attention",),
    }
    for spec in all_specs():
        assert set(spec.fusions_per_layer) <= set(FUSIONS), spec.name
    with pytest.raises(ValueError, match="do not count toward fusion 'Gelu'"):
        Fusion("Gelu", FUSIONS.get("Attention").rules)
