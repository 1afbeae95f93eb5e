"""The pipeline is assembled in one place from options; a pass receives configuration and data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from llm2trt.exporters import all_specs
from llm2trt.passes.fusions import FUSIONS, Fusion
from llm2trt.passes.manager import GraphPass, Model, PassResult
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.pipeline import PIPELINE, PipelineOptions, assemble, register_entry
from tests.passes.test_core import _model

CLEANUP = ["constant_folding", "identity_elimination", "cast_elimination", "dead_node_elimination"]


def names(passes: Sequence[GraphPass]) -> list[str]:
    return [p.name for p in passes]


def test_default_pipeline_and_skipping_every_fusion() -> None:
    fusions = [f"fuse_{name.lower()}" for name, f in FUSIONS.items() if f.rules]  # (MoE: made at export)
    assert names(assemble(PipelineOptions()).passes) == [*CLEANUP, "opset_upgrade", *fusions, "shape_inference"]
    none = assemble(PipelineOptions(skip_fusions=tuple(n for n, f in FUSIONS.items() if f.rules)))
    assert names(none.passes) == [*CLEANUP, "shape_inference"]  # no fused op, no opset upgrade


def test_configuration_reaches_a_built_in_pass() -> None:
    manager = assemble(PipelineOptions(opset=24))
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


@dataclass(frozen=True)
class ScaleSettings:
    """The entry's own typed options: configuration (`factor`) and data (`samples`)."""

    factor: float
    samples: list[float]


@pytest.fixture()
def calibrated_entry() -> Iterator[None]:
    def make(options: PipelineOptions) -> list[GraphPass]:
        settings = options.extra.get("scale_initializers")
        if not isinstance(settings, ScaleSettings):  # no data, no pass
            return []
        return [ScaleInitializers(settings.factor, settings.samples)]

    register_entry("scale_initializers", 150, make)
    yield
    PIPELINE.unregister("scale_initializers")


def test_a_registered_pass_takes_configuration_and_data(calibrated_entry: Any) -> None:
    assert "scale_initializers" not in names(assemble(PipelineOptions()).passes)  # no data, no pass
    rules = tuple(name for name, f in FUSIONS.items() if f.rules)
    options = PipelineOptions(skip_fusions=rules, extra={"scale_initializers": ScaleSettings(2.0, [1.0, 2.0])})
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
        "MoE": (),  # made at export (the experts traced as one llm2trt.MoE node): only counted
    }
    for spec in all_specs():
        assert set(spec.fusions_per_layer) <= set(FUSIONS), spec.name
    with pytest.raises(ValueError, match="do not count toward fusion 'Gelu'"):
        Fusion("Gelu", FUSIONS.get("Attention").rules)


def test_gqa_form_counts_its_contrib_ops_as_fusions(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """--kv-form gqa: ONNX Runtime's decoder vocabulary with llm2trt's norm+GEMV ops, five nodes a
    layer, the fusion gate still met."""
    import onnx

    from tests.conftest import CC, assert_clean_failure, run_cli, run_json

    code, report = run_json("optimize", artifacts["tiny:llama"], "-o", tmp_path / "gqa", "--kv-form", "gqa", "-q")
    assert code == 0, report
    assert {k: v for k, v in report["fusions"].items() if v} == {"Attention": 2, "RMSNorm": 5, "RoPE": 4}
    gqa = next(p for p in report["passes"] if p["name"] == "ort_gqa")["counts"]
    assert gqa == {
        "GroupQueryAttention": 2,
        "packed_qkv": 2,
        "SkipSimplifiedLayerNorm": 4,
        "QuickGelu": 2,
        "untied_lm_head": 0,
    }
    kernels = next(p for p in report["passes"] if p["name"] == "ort_kernels")["counts"]
    assert kernels == {
        "Linear": 4,
        "RMSNormLinear": 1,
        "SkipRMSNormLinear": 2,
        "SkipRMSNormSwiGLU": 2,
        "LinearF32": 0,  # fp32 logits already: the float-output twins are for fp16 graphs
        "RMSNormLinearF32": 0,
        "SkipRMSNormLinearF32": 0,
        "GroupQueryAttention": 2,
        "GroupQueryAttentionQKNorm": 0,  # Llama has no QK-norm
    }
    # GPT-2 ties lm_head to its embedding (stored once): llm2trt's Linear reads the embedding's rows
    # as they are, so the form neither transposes nor copies it.
    code, tied = run_json("optimize", artifacts["tiny:gpt2"], "-o", tmp_path / "gpt2-gqa", "--kv-form", "gqa", "-q")
    assert code == 0, tied
    assert next(p for p in tied["passes"] if p["name"] == "ort_gqa")["counts"]["untied_lm_head"] == 0
    gpt2 = onnx.load(str(tmp_path / "gpt2-gqa" / "model.onnx"), load_external_data=False)
    assert "Transpose" not in [n.op_type for n in gpt2.graph.node]
    head = gpt2.graph.node[-1]
    assert (head.domain, head.op_type, head.input[1]) == ("llm2trt", "Linear", "model.transformer.wte.weight")
    proto = onnx.load(str(tmp_path / "gqa" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    # Five nodes a layer (norm+qkv, GroupQueryAttention, o, norm+gate/up+SwiGLU, down) + the embedding
    # Gather + norm+lm_head; each llm2trt op carries its reference body as a local function.
    assert len(ops) == 12 and "MatMul" not in ops
    # ONNX Runtime's GroupQueryAttention lives on as the body of llm2trt's (one decode kernel).
    assert {n.domain for n in proto.graph.node if n.op_type == "GroupQueryAttention"} == {"llm2trt"}
    body = next(f for f in proto.functions if f.name == "GroupQueryAttention")
    assert [(n.domain, n.op_type) for n in body.node] == [("com.microsoft", "GroupQueryAttention")]
    assert sorted(f.name for f in proto.functions) == sorted(op for op, n in kernels.items() if n)
    assert [i.name for i in proto.graph.input][:4] == [
        "input_ids",
        "position_ids",
        "seqlens_k",
        "total_sequence_length",
    ]
    assert report["numeric_check"]["checked"] and max(report["numeric_check"]["max_rel_err"].values()) < 1e-5
    result = run_cli("build", tmp_path / "gqa", "-o", tmp_path / "engine", *CC)
    assert_clean_failure(
        result, "GroupQueryAttention (--kv-form gqa), which TensorRT cannot build", tmp_path / "engine"
    )
