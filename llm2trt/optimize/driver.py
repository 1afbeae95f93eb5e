"""optimize: run the pass pipeline over an artifact's graphs, check them numerically, write them out."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm2trt.convert.sources import spec_and_config
from llm2trt.convert.tokenizer import TOKENIZER_DIR
from llm2trt.core.artifact import check_output, load_onnx, staged_output
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import CheckFailed, InputError
from llm2trt.core.kv import BATCH, KVLayout
from llm2trt.core.log import step
from llm2trt.core.manifest import Dim, GraphSpec, Manifest, TensorSpec
from llm2trt.core.names import REPORT_NAME
from llm2trt.core.quant import QuantRequest
from llm2trt.core.records import Record
from llm2trt.core.reports import NumericCheck, OptimizeReport, Refusal
from llm2trt.core.tolerance import TolerancePolicy, profile_for
from llm2trt.exporters import ExportSpec
from llm2trt.optimize.check import conform, kv_numeric_check, numeric_check, save_graph
from llm2trt.optimize.requests import KVRequest
from llm2trt.passes.fusions import FUSIONS, count_fusions
from llm2trt.passes.kv_int8 import Scales
from llm2trt.passes.manager import Model, PipelineResult, WeightSpill
from llm2trt.passes.pattern import RewritePass, layer_of, module_of
from llm2trt.passes.pipeline import PipelineOptions, QuantOptions, assemble
from llm2trt.passes.qdq import QuantPass
from llm2trt.passes.quant_methods import METHODS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimized(Record):
    """What `optimize` did: one report per graph (the default graph's first)."""

    input: str
    output: str
    reports: dict[str, OptimizeReport]

    def to_dict(self) -> dict[str, Any]:
        # docs/contract.md: report.json's keys at the top level, for the default graph.
        first = next(iter(self.reports.values()))
        data = {"input": self.input, "output": self.output, **first.to_dict()}
        if len(self.reports) > 1:
            data["graphs"] = {name: r.to_dict() for name, r in self.reports.items()}
        return data

    def render(self) -> str:
        lines = []
        for name, report in self.reports.items():
            label = f" [{name}]" if len(self.reports) > 1 else ""
            lines.append(f"optimized {self.input} -> {self.output}{label}: {report.render()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Expectation:
    """What the architecture expects of an optimized graph: fusion counts in total and per layer."""

    layers: int
    per_layer: dict[str, int]
    total: dict[str, int]

    @classmethod
    def of(cls, spec: ExportSpec, config: Any, skip: tuple[str, ...]) -> Expectation:
        total = {k: v for k, v in spec.expected_fusions(config).items() if k not in skip}
        per_layer = {k: per for k, (per, _extra) in spec.fusions_per_layer.items()}
        return cls(spec.num_layers(config), per_layer, total)

    def missing(self, model: Model, found: dict[str, int], refusals: list[Refusal]) -> list[str]:
        """One line per expected fusion that fell short: the layers without it and why."""
        return [
            self._shortfall(model, fusion, found.get(fusion, 0), want, refusals)
            for fusion, want in self.total.items()
            if found.get(fusion, 0) < want
        ]

    def _shortfall(self, model: Model, fusion: str, have: int, want: int, refusals: list[Refusal]) -> str:
        ops = FUSIONS.get(fusion).ops
        seen: dict[int, int] = {}
        for node in model.graph.nodes:
            layer = layer_of(module_of(node.name)) if node.op in ops else None
            if layer is not None:
                seen[layer] = seen.get(layer, 0) + 1
        short = [i for i in range(self.layers) if seen.get(i, 0) < self.per_layer.get(fusion, 0)]
        reasons = [r for r in refusals if r.rule.split(".")[0] == fusion and (not short or layer_of(r.module) in short)]
        detail = "; ".join(f"{r.module or r.node}: {r.reason}" for r in reasons[:3]) or "no candidate matched"
        where = f"layers without it: {', '.join(map(str, short[:8]))}" if short else "outside the layers"
        return f"{fusion} {have}/{want} ({where}; {detail})"


def _report(
    model: Model, result: PipelineResult, expect: Expectation, options: PipelineOptions, nodes_before: int
) -> OptimizeReport:
    found = count_fusions(model.graph)
    rewrites = [p.name for p in result.passes if isinstance(p, RewritePass)]
    # A candidate one rule refused that a later rule fused (a ReduceMean LayerNorm looked at, inside
    # an RMSNorm) is gone from the graph: only refusals at nodes still there explain anything.
    alive = {n.name for n in model.graph.nodes}
    refusals = [r for res in result.results.values() for r in res.refusals if r.node in alive]
    return OptimizeReport(
        fusions=found,
        expected=expect.total,
        skipped=sorted(options.skip_fusions),
        missing=expect.missing(model, found, refusals),
        rules={rule: n for name in rewrites for rule, n in result.results[name].counts.items()},
        refusals=refusals,
        passes=result.records,
        nodes_before=nodes_before,
        nodes_after=len(model.graph.nodes),
        opset=model.opset,
        quantization=next((p.summary for p in result.passes if isinstance(p, QuantPass)), None),
    )


@dataclass(frozen=True)
class _Job:
    """One `optimize` run: the input artifact, its exporter spec and config (rebuilt once), the options."""

    artifact: Path
    manifest: Manifest
    spec: ExportSpec
    config: Any
    options: PipelineOptions
    kv: KVRequest
    check: bool
    quant: QuantRequest | None = None

    @property
    def tolerance(self) -> TolerancePolicy:
        """How far the optimized graph may be from its input: a quantization's profile (which also
        bounds the cosine), else the dtype's optimize tolerance."""
        if self.quant is not None:
            return profile_for(self.manifest.dtype, self.quant.method)
        if self.kv.dtype is not None:  # an INT8 cache rounds every cached key and value
            return KV_INT8_TOLERANCE
        dtype = self.manifest.dtype
        # Half precision also holds the direction: the rtol must pass graphs that only round
        # differently (the 7B shape's fused fp16 graph: 6.7e-3, fused norms and attention
        # computing in float32 where the input rounds to fp16), a cosine catches a wrong rewrite.
        cosine = None if dtype is DType.FP32 else HALF_MIN_COSINE
        return TolerancePolicy(dtype.value, dtype.tolerance.optimize, cosine)

    def optimize_graph(self, graph: GraphSpec, spill: Path | None = None) -> tuple[Model, OptimizeReport, GraphSpec]:
        """Run the pipeline over one graph; the graph's new description (its variant may change).
        Large weights the passes make go to the file `spill` as they are made."""
        spec, config = self.spec, self.config
        layout, variant = self.kv.plan(spec, config, graph)
        onnx_path = self.manifest.onnx_path(self.artifact, graph.name)
        with step(f"loading {onnx_path}"):
            # The weights stay on disk: passes read the few they rewrite (FileValues).
            model = Model.from_onnx(load_onnx(onnx_path, with_weights=False), weights_dir=onnx_path.parent)
        model.spill = WeightSpill(spill) if spill is not None else None
        limit = spec.position_limit(config)
        kv = replace(self.options.kv, layout=layout, insert=self.kv.insert)
        if limit:  # rotary tables as long as the model's positions
            kv = replace(kv, max_positions=limit)
        if layout is not None and layout.dtype is not None:
            kv = replace(kv, int8_scales=self._kv_scales(graph, onnx_path, layout, limit))
        quant = None
        if self.quant is not None:
            calibrator = None
            if METHODS.get(self.quant.method).needs_calibration:
                from llm2trt.optimize.calibrate import TextCalibrator

                calibrator = TextCalibrator.from_request(self.artifact, self.manifest, graph, self.quant, limit)
            quant = QuantOptions(self.quant, calibrator)
        options = replace(self.options, kv=kv, quant=quant)
        result = assemble(options).run(model)
        target = graph if variant == graph.name else spec.graph_spec(config, self.manifest.dtype, variant)
        if layout is not None and layout.dtype is not None:
            target = _cache_typed(target, layout)
        target = _with_lora(target, result)
        conform(model, target)
        expect = Expectation.of(spec, config, self.options.skip_fusions)
        return model, _report(model, result, expect, self.options, sum(graph.op_counts.values())), target

    def _kv_scales(self, graph: GraphSpec, onnx_path: Path, layout: KVLayout, limit: int | None) -> Scales:
        """The INT8 cache's scales, calibrated on the input graph's own cache (--calib's text, or the
        built-in calibration text)."""
        from llm2trt.optimize.calibrate import default_text
        from llm2trt.optimize.kv_scales import calibration_windows, kv_scales

        if graph.kv_cache is None:
            raise InputError("--kv-dtype int8 calibrates on the artifact's own KV cache: convert it with one")
        calib = self.quant.calib if self.quant is not None else None
        text = Path(calib) if calib is not None else default_text()
        windows = calibration_windows(self.artifact, self.manifest, text, limit)
        return kv_scales(onnx_path, graph, layout, windows)

    def numeric_check(self, before: GraphSpec, after: GraphSpec, written: Path) -> NumericCheck:
        if not self.check:
            return NumericCheck(False, "--no-check")
        reference = self.manifest.onnx_path(self.artifact, before.name)
        with step("checking the optimized graph against the input in ONNX Runtime"):
            if before.kv_cache is None and after.kv_cache is None:
                verdict = numeric_check(before, self.spec, self.config, reference, written, self.tolerance)
            else:
                # Token by token through each graph's own cache: a random cache is an input no model
                # makes (on SmolLM2 it put fp32 rounding at 1e-4 instead of 1e-6 through RMSNorm), and
                # a KV pass changes the interface anyway.
                verdict = kv_numeric_check((before, reference), (after, written), self.config, self.tolerance)
        if verdict.checked and not verdict.passed:
            raise CheckFailed(f"optimized graph diverges from its input: {verdict.breach()}")
        return verdict

    def write_graph(
        self, stage: Path, before: GraphSpec, graph: GraphSpec, model: Model, report: OptimizeReport
    ) -> tuple[GraphSpec, OptimizeReport]:
        """Save one optimized graph into the staging directory, check it, and describe it."""
        filename = Path(before.onnx).name
        with step(f"writing the optimized graph {filename}"):
            written = save_graph(model, graph, stage / filename, report.fusions, report.expected)
        verdict = self.numeric_check(before, graph, stage / filename)
        return written, replace(report, numeric_check=verdict)


HALF_MIN_COSINE = 0.9999  # fp16/bf16 optimize checks; measured 0.999996 on the 1.1B shape's fusions

# An INT8 cache's check: its rounding moves fp32 logits by a few percent of their range on the
# tiny models (docs/kv-cache.md); the direction must hold.
KV_INT8_TOLERANCE = TolerancePolicy("kv-int8", 0.25, 0.99)


def _with_lora(graph: GraphSpec, result: PipelineResult) -> GraphSpec:
    """The graph's description with the adapter inputs the LoRA pass added (if it ran)."""
    from llm2trt.passes.lora_slots import LoraPass

    lora = next((p for p in result.passes if isinstance(p, LoraPass)), None)
    if lora is None or lora.record is None:
        return graph
    record, float_type = lora.record, DType.find(lora.dtype) or DType.FP32
    weights = [
        TensorSpec(name, float_type, list[Dim](shape))
        for t in record.targets
        for name, shape in (
            (t.a, [record.slots, record.max_rank, t.in_features]),
            (t.b, [record.slots, t.out_features, record.max_rank]),
        )
    ]
    slot = TensorSpec(record.slot_input, DType.INT64, [BATCH])
    return replace(graph, inputs=[*graph.inputs, slot, *weights], lora=record)


def _cache_typed(graph: GraphSpec, layout: KVLayout) -> GraphSpec:
    """The graph's description with its cache inputs and outputs of the layout's cache dtype."""
    if layout.dtype is None:
        return graph
    names = set(layout.past_names) | set(layout.present_names)
    dtype = DType.parse(layout.dtype)

    def typed(specs: list[TensorSpec]) -> list[TensorSpec]:
        return [replace(t, dtype=dtype) if t.name in names else t for t in specs]

    return replace(graph, inputs=typed(graph.inputs), outputs=typed(graph.outputs), kv_cache=layout)


def optimize(
    artifact: Path,
    out: Path,
    *,
    check: bool = True,
    force: bool = False,
    options: PipelineOptions | None = None,
    kv: KVRequest | None = None,
    allow_missing_fusions: bool = False,
    quant: QuantRequest | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
) -> Optimized:
    """Optimize every graph of `artifact` into the artifact `out` (with `tp` > 1, one per rank; with
    `pp` > 1, one per pipeline stage)."""
    if quant is not None:  # the method's own checks (--calib, --keep-sensitive), before anything loads
        METHODS.get(quant.method).check(quant)
    manifest = Manifest.read(artifact)
    check_output(out, force, reads=[artifact])  # before the seconds of loading the model's config
    if manifest.tensor_parallel is not None:
        raise InputError(
            f"{artifact} is a tensor-parallel artifact ({manifest.tensor_parallel.render()}); optimize its source"
        )
    if manifest.pipeline_parallel is not None:
        raise InputError(
            f"{artifact} is a pipeline-parallel artifact ({manifest.pipeline_parallel.render()}); optimize its source"
        )
    if quant is not None and manifest.quantization is not None:
        raise InputError(
            f"--quant: {artifact} is already quantized ({manifest.quantization.method}); "
            "quantize its unquantized source"
        )
    spec, config = spec_and_config(manifest)
    options = options or PipelineOptions()
    if pp != 1:
        from llm2trt.optimize.stages import check_request as check_stages

        check_stages(spec, config, manifest, pp, tp, ep, lora=options.lora is not None)
    if ep > 1 and tp == 1:
        tp = ep  # --ep N alone: N ranks, attention split over them as well
    if tp != 1 or ep != 1:
        from llm2trt.optimize.ranks import check_request

        check_request(spec, config, manifest, tp, quant is not None, ep)
    job = _Job(artifact, manifest, spec, config, options, kv or KVRequest(), check, quant)
    with staged_output(out, force, reads=[artifact]) as stage:
        spill = stage / SPILL_DIR  # the weights passes make, on disk until they are saved
        spill.mkdir()
        results = {g.name: job.optimize_graph(g, spill / f"{g.name}.data") for g in manifest.graphs.values()}
        _check_expected(results, allow_missing_fusions)
        if tp > 1:
            optimized = _optimize_ranks(job, results, stage, tp, ep)
        elif pp > 1:
            optimized = _optimize_stages(job, results, stage, pp)
        else:
            optimized = _write(job, results, stage)
        shutil.rmtree(spill)
    return replace(optimized, output=str(out))


SPILL_DIR = ".spill"


def _check_expected(results: dict[str, tuple[Model, OptimizeReport, GraphSpec]], allow_missing: bool) -> None:
    missing = [line for _model, report, _graph in results.values() for line in report.missing]
    if missing and not allow_missing:
        raise CheckFailed(
            "expected fusions missing: "
            + " | ".join(missing)
            + " (pass --allow-missing-fusions to write the graph anyway)"
        )
    for line in missing:
        logger.warning("expected fusion missing: %s", line)


def _write(job: _Job, results: dict[str, tuple[Model, OptimizeReport, GraphSpec]], stage: Path) -> Optimized:
    """optimize without --tp: each graph, the manifest and the report into the staging directory."""
    manifest, artifact = job.manifest, job.artifact
    reports: dict[str, OptimizeReport] = {}
    graphs: dict[str, GraphSpec] = {}
    passes = []
    for name, (model, report, target) in results.items():
        before = manifest.graphs[name]
        written, reports[target.name] = job.write_graph(stage, before, target, model, report)
        graphs[target.name] = written
        passes += report.passes
    quantization = next(iter(reports.values())).quantization or manifest.quantization
    opset = max(m.opset for m, _r, _g in results.values())
    new = replace(manifest, graphs=graphs, opset=opset, quantization=quantization)
    new = copy_tokenizer(new.with_passes(passes), artifact, stage)
    new.write(stage)
    next(iter(reports.values())).write(stage / REPORT_NAME)
    return Optimized(str(artifact), str(stage), reports)


def _optimize_ranks(
    job: _Job, results: dict[str, tuple[Model, OptimizeReport, GraphSpec]], stage: Path, tp: int, ep: int = 1
) -> Optimized:
    """optimize --tp (--ep): the ranks' artifacts, checked together against the input."""
    from llm2trt.optimize.ranks import write_ranks

    def write(base: Manifest) -> tuple[Manifest, dict[str, Any]]:
        top, ranks = write_ranks(stage, base, job.spec, job.config, results, tp, ep)
        return top, {"ranks": ranks}

    return _optimize_split(job, results, stage, write, f"{tp} ranks")


def _optimize_stages(
    job: _Job, results: dict[str, tuple[Model, OptimizeReport, GraphSpec]], stage: Path, pp: int
) -> Optimized:
    """optimize --pp: the stages' artifacts, checked together against the input."""
    from llm2trt.optimize.stages import write_stages

    def write(base: Manifest) -> tuple[Manifest, dict[str, Any]]:
        top, stages = write_stages(stage, base, job.spec, job.config, results, pp)
        return top, {"stages": stages}

    return _optimize_split(job, results, stage, write, f"{pp} stages")


def _optimize_split(
    job: _Job,
    results: dict[str, tuple[Model, OptimizeReport, GraphSpec]],
    stage: Path,
    write: Callable[[Manifest], tuple[Manifest, dict[str, Any]]],
    parts: str,
) -> Optimized:
    """The split artifacts `write` makes (ranks or stages) and their top manifest; then every part run
    together (one process each, gloo: collectives, or the activations sent from stage to stage) as the
    decoder they make, prefill and decode steps against the input graph."""
    from llm2trt.optimize.ranks import check_ranks

    manifest, artifact = job.manifest, job.artifact
    passes = [r for _m, report, _g in results.values() for r in report.passes]
    opset = max(m.opset for m, _r, _g in results.values())
    top, split = write(copy_tokenizer(replace(manifest, opset=opset).with_passes(passes), artifact, stage))
    top.write(stage)
    name, (_model, report, target) = next(iter(results.items()))
    verdict = NumericCheck(False, "--no-check")
    if job.check:
        if target.kv_cache is None and manifest.graphs[name].kv_cache is None:
            verdict = NumericCheck(False, "split graphs are checked as decoders; this one has no KV cache")
        else:
            with step(f"checking the {parts} together against the input (ONNX Runtime + gloo)"):
                before = (manifest.graphs[name], manifest.onnx_path(artifact, name))
                verdict = check_ranks(stage, before, job.config, job.tolerance)
            if not verdict.passed:
                raise CheckFailed(f"the {parts} together diverge from the input: {verdict.breach()}")
    report = replace(report, numeric_check=verdict, **split)
    report.write(stage / REPORT_NAME)
    return Optimized(str(artifact), str(stage), {target.name: report})


def copy_tokenizer(manifest: Manifest, artifact: Path, stage: Path) -> Manifest:
    """The tokenizer travels with every artifact made from one that has it."""
    generation = manifest.generation
    if generation is None or generation.tokenizer is None:
        return manifest
    shutil.copytree(artifact / generation.tokenizer, stage / TOKENIZER_DIR)
    return replace(manifest, generation=replace(generation, tokenizer=TOKENIZER_DIR))
