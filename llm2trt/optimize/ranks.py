"""optimize --tp: one artifact per rank under rank{r}/, checked together against the input.

The pipeline runs once (fusions, cache form); each rank's graph is then the tensor-parallel pass
over a copy of the result, typed again and written to `rank{r}/` with a manifest of its own (its
KV heads, its mapping). The top manifest lists the ranks; its graphs are rank 0's (paths into
rank0/), so readers of one graph see a rank's I/O. The check runs every rank in the harness
(llm2trt.backends.onnxruntime.ranks) on the probe prompts and compares its logits to the input artifact's.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from llm2trt.core.errors import CheckFailed, InputError
from llm2trt.core.log import step
from llm2trt.core.lora import LoraShard, LoraTarget
from llm2trt.core.manifest import Dim, GraphSpec, Manifest, PassRecord, TensorSpec
from llm2trt.core.reports import NumericCheck, OptimizeReport
from llm2trt.core.tolerance import TolerancePolicy
from llm2trt.core.tp import Mapping, RankReport, TensorParallel, TPPlan, check_experts
from llm2trt.exporters import ExportSpec
from llm2trt.passes.cleanup import ShapeInference
from llm2trt.passes.fusions import count_fusions
from llm2trt.passes.manager import Model, PassManager, WeightSpill, weight_bytes
from llm2trt.passes.tensor_parallel import TensorParallelPass

if TYPE_CHECKING:
    from llm2trt.backends.onnxruntime.ranks import RankContext

RANK_DIR = "rank{}"


def rank_graph(graph: GraphSpec, plan: TPPlan, lora_shards: dict[str, LoraShard] | None = None) -> GraphSpec:
    """A graph's description on one rank: the cache holds the rank's KV heads; runtime LoRA's
    adapter inputs the rank's cut of each layer."""
    graph = _rank_lora(graph, lora_shards or {})
    kv = graph.kv_cache
    if kv is None:
        return graph
    heads = plan.local_heads[1]
    names = {*kv.past_names, *kv.present_names}

    def local(tensors: list[TensorSpec]) -> list[TensorSpec]:
        return [replace(t, shape=[t.shape[0], heads, *t.shape[2:]]) if t.name in names else t for t in tensors]

    return replace(
        graph, inputs=local(graph.inputs), outputs=local(graph.outputs), kv_cache=replace(kv, num_kv_heads=heads)
    )


def _rank_lora(graph: GraphSpec, shards: dict[str, LoraShard]) -> GraphSpec:
    lora = graph.lora
    if lora is None:
        return graph
    missing = [t.module for t in lora.targets if t.module not in shards]
    if missing:
        raise InputError(f"--tp: the low-rank paths of {', '.join(missing[:3])} were not split with their layers")
    targets: list[LoraTarget] = []
    shapes: dict[str, list[Dim]] = {}
    for t in lora.targets:
        shard = shards[t.module]
        width = sum(stop - start for start, stop in shard.runs)
        local = (
            replace(t, shard=shard, in_features=width)
            if shard.weight == "a"
            else replace(t, shard=shard, out_features=width)
        )
        targets.append(local)
        shapes[t.a] = [lora.slots, lora.max_rank, local.in_features]
        shapes[t.b] = [lora.slots, local.out_features, lora.max_rank]
    inputs = [replace(i, shape=shapes[i.name]) if i.name in shapes else i for i in graph.inputs]
    return replace(graph, inputs=inputs, lora=replace(lora, targets=targets))


def check_request(spec: ExportSpec, config: Any, manifest: Manifest, tp: int, quantizing: bool, ep: int = 1) -> None:
    """Refuse, before any work, a --tp (--ep) this artifact cannot take."""
    if tp < 1:
        raise InputError(f"--tp must be at least 1 (got {tp})")
    mapping = Mapping(tp, 0, ep)  # an --ep that does not divide the ranks is refused here
    experts = spec.experts(config)
    if ep > 1 and experts is None:
        raise InputError(f"--ep {ep}: {spec.name} has no mixture of experts to spread")
    if experts is not None:
        check_experts(*experts, mapping)
    if manifest.tensor_parallel is not None:
        raise InputError(f"--tp: the input is already split ({manifest.tensor_parallel.render()})")
    if tp > 1 and (quantizing or manifest.quantization is not None):
        raise InputError("--tp with quantization is not built yet: split an unquantized artifact")
    spec.check_tp(config, tp)


def split_graph(
    model: Model, graph: GraphSpec, plan: TPPlan, num_layers: int, spill: Path | None = None
) -> tuple[Model, RankReport, list[PassRecord], dict[str, LoraShard]]:
    """One rank's copy of an optimized graph, rewritten and typed, and its LoRA paths' cuts; its
    slices go to `spill` as they are cut (else they stay in memory)."""
    copy = Model(model.graph.copy(), dict(model.node_metadata), model.ir_version, model.weights_dir)
    copy.spill = WeightSpill(spill) if spill is not None else None
    split = TensorParallelPass(plan, graph.kv_cache, num_layers)
    result = PassManager([split, ShapeInference()]).run(copy)
    counts = result.results[TensorParallelPass.name].counts
    weights = graph_weight_bytes(copy)
    heads = plan.local_heads[1] if graph.kv_cache is not None else None
    report = RankReport(plan.mapping.rank, dict(counts), count_fusions(copy.graph), heads, weights)
    return copy, report, result.records, split.lora_shards


def write_ranks(
    stage: Path,
    manifest: Manifest,
    spec: ExportSpec,
    config: Any,
    optimized: dict[str, tuple[Model, OptimizeReport, GraphSpec]],
    tp: int,
    ep: int = 1,
) -> tuple[Manifest, list[RankReport]]:
    """Write rank{r}/ for every rank; the top manifest (not yet written) and the per-rank reports."""
    from llm2trt.optimize.check import conform, save_graph

    reports: list[RankReport] = []
    ranks = [RANK_DIR.format(r) for r in range(tp)]
    top_graphs: dict[str, GraphSpec] = {}
    for mapping in Mapping.ranks(tp, ep):
        plan = spec.tp_plan(config, mapping)
        folder = stage / ranks[mapping.rank]
        folder.mkdir()
        graphs: dict[str, GraphSpec] = {}
        records: list[PassRecord] = []
        for name, (model, report, target) in optimized.items():
            spill = stage / f".rank{mapping.rank}-{name}.spill"
            with step(f"rank {mapping.rank} of {tp}: splitting graph {name!r}"):
                rank_model, rank_report, ran, shards = split_graph(model, target, plan, spec.num_layers(config), spill)
            records += ran
            graph = rank_graph(target, plan, shards)
            conform(rank_model, graph)
            missing = {k: v for k, v in report.expected.items() if rank_report.fusions.get(k, 0) < v}
            if missing:
                raise CheckFailed(f"rank {mapping.rank}: fusions lost by the split: {missing} of {report.expected}")
            path = folder / Path(target.onnx).name
            graphs[target.name] = save_graph(rank_model, graph, path, rank_report.fusions, report.expected)
            del rank_model  # before the next rank's slices
            spill.unlink(missing_ok=True)
            reports.append(rank_report)
        rank_manifest = write_part(
            manifest, folder, records, graphs, tensor_parallel=TensorParallel(tp, mapping.rank, ep=ep)
        )
        if mapping.rank == 0:
            top_graphs = rank_manifest.moved(folder, stage).graphs
    return replace(manifest, graphs=top_graphs, tensor_parallel=TensorParallel(tp, None, ranks, ep)), reports


def graph_weight_bytes(model: Model) -> int:
    """The bytes of a split graph's constants (a rank's or a stage's share of the weights)."""
    return sum(weight_bytes(t) for t in model.graph.tensors().values() if isinstance(t, gs.Constant))


def write_part(
    manifest: Manifest, folder: Path, records: list[PassRecord], graphs: dict[str, GraphSpec], **split: Any
) -> Manifest:
    """The manifest of one part of a split artifact (a rank, a stage) in `folder`, one level below the
    top: its graphs, the passes that cut it, the tokenizer found one level up, and its split record."""
    generation = manifest.generation
    if generation is not None and generation.tokenizer is not None:
        generation = replace(generation, tokenizer=f"../{generation.tokenizer}")
    part = replace(manifest.with_passes(records), graphs=graphs, generation=generation, **split)
    part.write(folder)
    return part


def _probe_task(ctx: RankContext, prompts: list[list[int]], tokens: np.ndarray, capacity: int) -> list[np.ndarray]:
    """In each rank: the probe through the rank's decoder graph, a segment's weights at a time."""
    from llm2trt.optimize.check import DecodeProbe

    return DecodeProbe(prompts, tokens).run(ctx.session(ctx.manifest.graph(), capacity, stream=True))


def check_ranks(artifact: Path, before: tuple[GraphSpec, Path], config: Any, policy: TolerancePolicy) -> NumericCheck:
    """Every rank together (the harness, gloo) against the input graph, step by step."""
    from llm2trt.backends.onnxruntime.ranks import run_ranks
    from llm2trt.core.memory import trim_heap
    from llm2trt.optimize.check import DecodeProbe

    probe = DecodeProbe.of(config)
    reference = probe.run_graph(*before)
    trim_heap()  # the split's freed slices and the reference run's segments, before the ranks start beside us
    task = functools.partial(_probe_task, prompts=probe.prompts, tokens=probe.tokens, capacity=probe.capacity)
    got = run_ranks(artifact, task)
    return probe.verdict(reference, got, policy)
