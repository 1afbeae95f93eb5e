"""optimize --pp: one artifact per pipeline stage under stage{s}/, checked together against the input.

The pipeline runs once (fusions, cache form); each stage's graph is then the pipeline cut
(passes/pipeline_parallel.py) of a copy of the result, written to `stage{s}/` with a manifest of
its own (its layers, its cache numbered from 0). The top manifest lists the stages; its graphs are
stage 0's (paths into stage0/). The check runs every stage in the rank harness (one process per
stage, the activations sent from each stage to the next) on the probe prompts and compares the
logits to the input artifact's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import CheckFailed, InputError
from llm2trt.core.kv import BATCH, KV_KINDS, SEQUENCE, past_name, present_name
from llm2trt.core.log import step
from llm2trt.core.manifest import GraphSpec, Manifest, PassRecord, TensorSpec
from llm2trt.core.pp import PipelineParallel, StageLayers, StagePlan, StageReport, is_activation, stage_layers
from llm2trt.core.reports import OptimizeReport
from llm2trt.exporters import ExportSpec
from llm2trt.passes.fusions import count_fusions
from llm2trt.passes.manager import Model, PassManager
from llm2trt.passes.pattern import layer_of, module_of
from llm2trt.passes.pipeline_parallel import PipelineParallelPass

STAGE_DIR = "stage{}"


def check_request(
    spec: ExportSpec, config: Any, manifest: Manifest, pp: int, tp: int = 1, ep: int = 1, lora: bool = False
) -> list[StageLayers]:
    """Refuse, before any work, a --pp this artifact cannot take; the layers of each stage."""
    if pp < 1:
        raise InputError(f"--pp must be at least 1 (got {pp})")
    for flag, ranks in (("--tp", tp), ("--ep", ep)):
        if pp > 1 and ranks > 1:
            raise InputError(f"--pp with {flag} is not built yet: split into stages or into ranks, not both")
    if pp > 1 and lora:
        raise InputError("--lora-slots with --pp is not built yet: split the layers without slots, or use --tp")
    if manifest.split is not None:
        raise InputError(f"--pp: the input is already split ({manifest.split})")
    if manifest.task != "text-generation":
        raise InputError(
            f"--pp: {manifest.architecture} is not a decoder ({manifest.task}); only decoders split into stages"
        )
    return stage_layers(spec.num_layers(config), pp)


def stage_graph(graph: GraphSpec, plan: StagePlan, model: Model) -> GraphSpec:
    """A graph's description on one stage: its activations, its layers' cache (numbered from 0), the
    inputs its cut still reads, and the logits on the last stage only."""
    kv = graph.kv_cache
    local: dict[str, str] = {}
    for j, layer in enumerate(plan.layers.layers if kv is not None else ()):
        for kind in KV_KINDS:
            local[past_name(layer, kind)] = past_name(j, kind)
            local[present_name(layer, kind)] = present_name(j, kind)
    cache = {*kv.past_names, *kv.present_names} if kv is not None else set()

    def keep(specs: list[TensorSpec], tensors: list[gs.Tensor]) -> list[TensorSpec]:
        have = {t.name for t in tensors}
        kept = [_activation_spec(t) for t in tensors if is_activation(t.name) or is_activation(t.name, out=True)]
        for spec in specs:
            name = local.get(spec.name, spec.name) if spec.name in cache else spec.name
            if (spec.name not in cache or spec.name in local) and name in have:
                kept.append(replace(spec, name=name))
        return kept

    inputs, outputs = keep(graph.inputs, model.graph.inputs), keep(graph.outputs, model.graph.outputs)
    used = {d for t in (*inputs, *outputs) for d in t.symbolic_dims()}
    if kv is not None:
        windows = tuple(kv.window(i) for i in plan.layers.layers) if kv.windows else ()
        kv = replace(kv, num_layers=plan.layers.count, windows=windows)
    main = graph.main_output if plan.last else outputs[0].name
    return replace(
        graph,
        inputs=inputs,
        outputs=outputs,
        main_output=main,
        kv_cache=kv,
        dims={d: r for d, r in graph.dims.items() if d in used},
    )


def _activation_spec(tensor: gs.Tensor) -> TensorSpec:
    return TensorSpec(tensor.name, DType.parse(tensor.dtype), [BATCH, SEQUENCE, int(tensor.shape[-1])])


def split_stage(
    model: Model, graph: GraphSpec, plan: StagePlan
) -> tuple[Model, GraphSpec, list[PassRecord], dict[str, int]]:
    """One stage's copy of an optimized graph, cut; its description, the pass records and counts."""
    copy = Model(model.graph.copy(), dict(model.node_metadata), model.ir_version, model.weights_dir)
    result = PassManager([PipelineParallelPass(plan, graph.kv_cache)]).run(copy)
    counts = result.results[PipelineParallelPass.name].counts
    return copy, stage_graph(graph, plan, copy), result.records, dict(counts)


def stage_fusions(
    spec: ExportSpec, model: Model, plan: StagePlan, expected: dict[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """The fusions a stage's graph holds, and what it should: each expected fusion's per-layer share
    for its layers, and those outside layers (the final norm, the embedding's) that it holds. A
    stage short of its layers' share is refused (the cut lost a fused node)."""
    found = count_fusions(model.graph)
    in_layers = count_fusions(gs.Graph(nodes=[n for n in model.graph.nodes if layer_of(module_of(n.name)) is not None]))
    want: dict[str, int] = {}
    short: dict[str, str] = {}
    for fusion in expected:
        per = spec.fusions_per_layer.get(fusion, (0, 0))[0] * plan.layers.count
        want[fusion] = per + found.get(fusion, 0) - in_layers.get(fusion, 0)
        if in_layers.get(fusion, 0) < per:
            short[fusion] = f"{in_layers.get(fusion, 0)}/{per}"
    if short:
        raise CheckFailed(f"stage {plan.stage} ({plan.layers.render()}): fusions lost by the cut: {short}")
    return found, want


def write_stages(
    root: Path,
    manifest: Manifest,
    spec: ExportSpec,
    config: Any,
    optimized: dict[str, tuple[Model, OptimizeReport, GraphSpec]],
    pp: int,
) -> tuple[Manifest, list[StageReport]]:
    """Write stage{s}/ for every stage; the top manifest (not yet written) and the per-stage reports."""
    from llm2trt.optimize.check import conform, save_graph
    from llm2trt.optimize.ranks import graph_weight_bytes, write_part

    reports: list[StageReport] = []
    plans = StagePlan.stages(spec.num_layers(config), pp)
    dirs = [STAGE_DIR.format(p.stage) for p in plans]
    top_graphs: dict[str, GraphSpec] = {}
    totals: dict[str, dict[str, int]] = {name: {} for name in optimized}
    for plan in plans:
        folder = root / dirs[plan.stage]
        folder.mkdir()
        graphs: dict[str, GraphSpec] = {}
        records: list[PassRecord] = []
        for name, (model, report, target) in optimized.items():
            with step(f"stage {plan.stage} of {pp} ({plan.layers.render()}): cutting graph {name!r}"):
                stage_model, graph, ran, counts = split_stage(model, target, plan)
            records += ran
            conform(stage_model, graph)
            fusions, expected = stage_fusions(spec, stage_model, plan, report.expected)
            for fusion, n in fusions.items():
                totals[name][fusion] = totals[name].get(fusion, 0) + n
            graphs[graph.name] = save_graph(stage_model, graph, folder / Path(target.onnx).name, fusions, expected)
            weights = graph_weight_bytes(stage_model)
            receives = [t.name for t in graph.inputs if is_activation(t.name)]
            sends = [t.name for t in graph.outputs if is_activation(t.name, out=True)]
            reports.append(StageReport(plan.stage, plan.layers, counts, fusions, receives, sends, weights))
            del stage_model
        record = PipelineParallel(pp, plan.stage, [], [plan.layers])
        stage_manifest = write_part(manifest, folder, records, graphs, pipeline_parallel=record)
        if plan.first:
            top_graphs = stage_manifest.moved(folder, root).graphs
    _check_totals(optimized, totals)
    record = PipelineParallel(pp, None, dirs, [p.layers for p in plans])
    return replace(manifest, graphs=top_graphs, pipeline_parallel=record), reports


def _check_totals(
    optimized: dict[str, tuple[Model, OptimizeReport, GraphSpec]], totals: dict[str, dict[str, int]]
) -> None:
    """The stages together hold every fused node of the unsplit graph."""
    for name, (_model, report, _graph) in optimized.items():
        lost = {f: f"{totals[name].get(f, 0)}/{n}" for f, n in report.fusions.items() if totals[name].get(f, 0) < n}
        if lost:
            raise CheckFailed(f"graph {name!r}: the stages together hold fewer fused nodes than the graph: {lost}")
