"""optimize --pp: stage graphs that together compute the unsplit model (one process per stage, the
hidden state sent from stage to stage with gloo), transformers' greedy tokens through them, per-stage
engines that build, the cut's refusals and the layers each stage holds."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from llm2trt.backends.onnxruntime.ranks import run_ranks
from llm2trt.convert.sources import resolve_model
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.kv import KVLayout
from llm2trt.core.manifest import Manifest
from llm2trt.core.pp import StageLayers, StagePlan, stage_layers
from llm2trt.passes.manager import Model
from llm2trt.passes.pipeline_parallel import PipelineParallelPass
from tests.conftest import CC, assert_clean_failure, run_cli, run_json
from tests.pp_tasks import greedy_batches
from tests.test_generate import NEW, TINY_DECODERS, hf_generate

PROMPTS = [[11, 57, 300, 8, 91], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [400, 3, 77], [9, 8, 7, 6, 5, 4, 3, 2]]
Split = Callable[[str, str], Path]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`convert tiny:<arch>`, once per module and architecture (only those a test asks for)."""
    root, done = tmp_path_factory.mktemp("pp"), {}

    def get(name: str) -> Path:
        if name not in done:
            out = root / name.split(":")[1]
            result = run_cli("convert", name, "-o", out, "-q")
            assert result.exit_code == 0, result.stderr
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="module")
def split(converted: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Split:
    """`optimize --pp 2` (checked) of one architecture in one cache form, once; its report checked."""
    root, done = tmp_path_factory.mktemp("pp2"), {}

    def get(name: str, form: str) -> Path:
        if (name, form) not in done:
            out = root / f"{name.split(':')[1]}-{form}"
            code, result = run_json("optimize", converted(name), "-o", out, "--pp", "2", "--kv-form", form, "-q")
            assert code == 0, result
            check = result["numeric_check"]
            assert check["checked"] and check["passed"] and len(check["max_rel_err"]) == 4, check
            assert max(check["max_rel_err"].values()) <= 1e-5, check
            _check_stages(result["stages"], out)
            done[(name, form)] = out
        return done[(name, form)]

    return get


def _check_stages(stages: list[dict[str, Any]], out: Path) -> None:
    """Each stage holds one of the 2 layers: its cache, the hidden state in or out, its fusions."""
    assert [(s["stage"], s["layers"]) for s in stages] == [(0, {"first": 0, "count": 1}), (1, {"first": 1, "count": 1})]
    assert stages[0]["receives"] == [] and stages[1]["sends"] == []
    assert stages[0]["sends"] == ["hidden_states_out"] and stages[1]["receives"] == ["hidden_states"]
    for stage in stages:
        assert stage["counts"]["kv_tensors"] == 4 and stage["fusions"]["Attention"] == 1, stage
    top = Manifest.read(out)
    assert top.pipeline_parallel is not None and top.pipeline_parallel.stages == ["stage0", "stage1"]
    assert top.pipeline_parallel.layers == [StageLayers(0, 1), StageLayers(1, 1)]
    for s in range(2):
        manifest = Manifest.read(out / f"stage{s}")
        assert manifest.pipeline_parallel is not None and manifest.pipeline_parallel.stage == s
        graph = manifest.graph()
        assert graph.kv_cache is not None and graph.kv_cache.num_layers == 1
        names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        assert {"past_key_values.0.key", "present.0.value"} <= names and "past_key_values.1.key" not in names
        assert "input_ids" in names or s == 1  # a later stage keeps it only where a shape is read from it
        assert ("logits" in names) == (s == 1)
        hidden = next(t for t in graph.inputs + graph.outputs if t.name.startswith("hidden_states"))
        assert hidden.shape[:2] == ["batch", "sequence"] and hidden.dtype is DType.FP32


MOE_MODELS = ["tiny:mixtral", "tiny:qwen3_moe", "tiny:qwen2_moe"]


@pytest.mark.parametrize(
    ("name", "form"), [(name, "growing") for name in TINY_DECODERS + MOE_MODELS] + [("tiny:llama", "fixed")]
)
def test_stages_give_transformers_tokens(split: Split, name: str, form: str) -> None:
    out = split(name, form)
    model = resolve_model(name).load(DType.FP32)
    pad = int(model.config.pad_token_id or 0)  # what generate pads with (the manifest's pad id)
    batches = [PROMPTS, [PROMPTS[1]]]  # a left-padded batch of 4, and one prompt alone
    task = functools.partial(
        greedy_batches, batches=batches, new=NEW, capacity=NEW + max(map(len, PROMPTS)), pad_id=pad
    )
    got = run_ranks(out, task)
    assert got == [hf_generate(model, prompts, pad=pad) for prompts in batches]


def test_generate_runs_the_stages(split: Split) -> None:
    out = split("tiny:llama", "growing")
    code, result = run_json("generate", out, "--ids", ",".join(map(str, PROMPTS[1])), "--max-new-tokens", "8", "-q")
    assert code == 0 and result["runner"] == "ort pp2", result
    model = resolve_model("tiny:llama").load(DType.FP32)
    assert result["ids"][len(PROMPTS[1]) :] == hf_generate(model, [PROMPTS[1]], pad=0, new=8)[0]


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:mixtral"])
def test_per_stage_engines_build(split: Split, name: str, tmp_path: Path) -> None:
    out = split(name, "growing")
    code, built = run_json("build", out, "-o", tmp_path / "engines", *CC, "-q")
    assert code == 0, built
    assert built["pp"] == 2 and [s["engine"] for s in built["stages"]] == ["stage0.engine", "stage1.engine"]
    for stage in built["stages"]:
        assert stage["profile_names"] == ["prefill", "decode"]
        assert (tmp_path / "engines" / stage["engine"]).stat().st_size == stage["engine_bytes"] > 0
    # Stage 1 takes the hidden state over the same batch and sequence ranges as stage 0's tokens.
    prefill, decode = built["stages"][1]["optimization_profiles"]
    assert prefill["hidden_states"]["max"][:2] == prefill["position_ids"]["max"]
    assert decode["hidden_states"]["opt"][1] == 1
    assert json.loads((tmp_path / "engines" / "build.json").read_text())["pp"] == 2
    text = run_cli("inspect", tmp_path / "engines").stdout
    assert "pipeline par. pp 2:" in text and "stage1 (layer 1)" in text


def test_pp_refusals(split: Split, converted: Callable[[str], Path], tmp_path: Path) -> None:
    llama, out = converted("tiny:llama"), tmp_path / "out"
    assert_clean_failure(
        run_cli("optimize", llama, "-o", out, "--pp", "3"), "--pp 3: 2 layers do not divide into 3 stages", out
    )
    assert_clean_failure(run_cli("optimize", llama, "-o", out, "--pp", "0"), "--pp must be at least 1", out)
    assert_clean_failure(
        run_cli("optimize", llama, "-o", out, "--pp", "2", "--tp", "2"), "--pp with --tp is not built yet", out
    )
    assert_clean_failure(
        run_cli("optimize", converted("tiny:bert"), "-o", out, "--pp", "2"), "--pp: bert is not a decoder", out
    )
    staged = split("tiny:llama", "growing")
    assert_clean_failure(run_cli("optimize", staged, "-o", out, "--pp", "2"), "is a pipeline-parallel artifact", out)
    assert_clean_failure(run_cli("compare", staged), "compare: this artifact is pipeline-parallel (pp 2")
    assert_clean_failure(run_cli("generate", staged, "--ids", "1,2", "--runner", "trt"), "runs on the rank harness")
    assert_clean_failure(
        run_cli("build", staged / "stage1", "-o", out), "is one stage of a pipeline-parallel artifact", out
    )


def test_stage_layers_are_equal_contiguous_blocks() -> None:
    assert stage_layers(30, 3) == [StageLayers(0, 10), StageLayers(10, 10), StageLayers(20, 10)]
    assert [p.stage_of(layer) for p in StagePlan.stages(4, 2)[:1] for layer in range(4)] == [0, 0, 1, 1]
    with pytest.raises(InputError, match="--pp 4: 30 layers do not divide into 4 stages"):
        stage_layers(30, 4)


def _chain(layers: int, skip_to: int | None = None) -> Model:
    """input_ids -> embedding -> `layers` layers (an Add each) -> lm_head; with `skip_to`, that layer
    also reads the embedding's output."""
    ids = gs.Variable("input_ids", np.int64, ["batch", "sequence"])
    table = gs.Constant("embed", np.ones((10, 4), np.float32))
    x = gs.Variable("/model/embed_tokens/Gather_output_0", np.float32, ["batch", "sequence", 4])
    nodes = [gs.Node("Gather", "/model/embed_tokens/Gather", inputs=[table, ids], outputs=[x])]
    embedded = x
    for i in range(layers):
        y = gs.Variable(f"/model/layers.{i}/Add_output_0", np.float32, ["batch", "sequence", 4])
        other = embedded if i == skip_to else gs.Constant(f"bias{i}", np.full(4, i, np.float32))
        nodes.append(gs.Node("Add", f"/model/layers.{i}/Add", inputs=[x, other], outputs=[y]))
        x = y
    logits = gs.Variable("logits", np.float32, ["batch", "sequence", 10])
    nodes.append(
        gs.Node(
            "MatMul",
            "/model/lm_head/MatMul",
            inputs=[x, gs.Constant("head", np.ones((4, 10), np.float32))],
            outputs=[logits],
        )
    )
    return Model(gs.Graph(nodes=nodes, inputs=[ids], outputs=[logits], opset=23))


def test_the_cut_passes_the_hidden_state_through_a_middle_stage() -> None:
    plan = StagePlan.stages(3, 3)[1]
    model = _chain(3)
    counts = PipelineParallelPass(plan, None).run(model).counts
    graph = model.graph
    assert [t.name for t in graph.inputs] == ["hidden_states"] and [t.name for t in graph.outputs] == [
        "hidden_states_out"
    ]
    assert [n.name for n in graph.nodes] == ["/model/layers.1/Add"]
    assert (counts["activations_in"], counts["activations_out"], counts["dropped_nodes"]) == (1, 1, 4)
    onnx.checker.check_model(gs.export_onnx(graph))


def test_the_cut_refuses_a_tensor_read_two_stages_later() -> None:
    with pytest.raises(InputError, match="reads '/model/embed_tokens/Gather_output_0' of stage 0: only activations"):
        PipelineParallelPass(StagePlan.stages(3, 3)[2], None).run(_chain(3, skip_to=2))
    # Read by the next stage, the embedding's output is a second activation.
    model = _chain(2, skip_to=1)
    counts = PipelineParallelPass(StagePlan.stages(2, 2)[1], None).run(model).counts
    assert counts["activations_in"] == 2 and [t.name for t in model.graph.inputs] == [
        "hidden_states",
        "hidden_states.1",
    ]


def test_the_cut_needs_a_decoder() -> None:
    model = _chain(2)
    model.graph.inputs[0].name = "pixel_values"
    with pytest.raises(InputError, match="no input_ids input"):
        PipelineParallelPass(StagePlan.stages(2, 2)[0], KVLayout(2, 1, 4)).run(model)


def test_three_stages_pass_the_hidden_state_through_the_middle(tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1003,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    assert run_cli("convert", tmp_path / "hf", "-o", tmp_path / "onnx", "-q").exit_code == 0
    code, result = run_json("optimize", tmp_path / "onnx", "-o", tmp_path / "pp3", "--pp", "3", "-q")
    assert code == 0 and max(result["numeric_check"]["max_rel_err"].values()) <= 1e-5, result
    middle = result["stages"][1]
    assert (middle["receives"], middle["sends"]) == (["hidden_states"], ["hidden_states_out"])
    graph = Manifest.read(tmp_path / "pp3" / "stage1").graph()
    assert graph.main_output == "hidden_states_out" and graph.kv_cache is not None
    assert graph.kv_cache.num_layers == 1 and "input_ids" not in {t.name for t in graph.inputs}
