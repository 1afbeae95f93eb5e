"""optimize: run the pass pipeline over an artifact's graphs, check them numerically, write them out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm2trt.core.artifact import load_onnx, op_counts, save_onnx, staged_output
from llm2trt.core.errors import BackendError, CheckFailed
from llm2trt.core.log import step
from llm2trt.core.manifest import REPORT_NAME, GraphSpec, Manifest
from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.core.records import Record
from llm2trt.core.reports import NumericCheck, OptimizeReport, Refusal
from llm2trt.exporters import ExportSpec
from llm2trt.models import spec_and_config
from llm2trt.passes.core import Model, PipelineResult
from llm2trt.passes.fusions import FUSIONS, count_fusions
from llm2trt.passes.pattern import RewritePass, layer_of, module_of
from llm2trt.passes.pipeline import PipelineOptions, assemble

logger = logging.getLogger(__name__)

CHECK_BATCH, CHECK_SEQUENCE = 2, 16


@dataclass(frozen=True)
class Optimized(Record):
    """What `optimize` did: one report per graph (the default graph's first)."""

    input: str
    output: str
    reports: dict[str, OptimizeReport]

    def to_dict(self) -> dict[str, Any]:
        # SPEC.md: report.json's keys at the top level, for the default graph.
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


def numeric_check(
    manifest: Manifest, graph: GraphSpec, spec: ExportSpec, config: Any, before: Path, after: Path
) -> NumericCheck:
    """Run both graphs in ONNX Runtime on the same inputs; the error per output and the verdict."""
    sequence = CHECK_SEQUENCE
    if "sequence" in graph.dims:
        sequence = min(sequence, graph.dims["sequence"].max)
    feeds = spec.sample_inputs(config, graph, CHECK_BATCH, sequence, seed=1)
    tolerance = manifest.dtype.tolerance.optimize
    try:
        reference = run_ort(before, feeds)
    except BackendError as exc:
        return NumericCheck(False, f"the input graph does not run in ONNX Runtime here ({exc})")
    outputs = run_ort(after, feeds)
    errors = {name: normwise_rel_err(outputs[name], ref) for name, ref in reference.items()}
    passed = all(err <= tolerance for err in errors.values())
    return NumericCheck(True, None, tolerance, errors, passed, CHECK_BATCH, sequence)


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
    refusals = [r for name in rewrites for r in result.results[name].refusals if r.node in alive]
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
    )


def _optimize_graph(
    artifact: Path, manifest: Manifest, graph: GraphSpec, options: PipelineOptions
) -> tuple[Model, OptimizeReport]:
    onnx_path = manifest.onnx_path(artifact, graph.name)
    with step(f"loading {onnx_path}"):
        model = Model.from_onnx(load_onnx(onnx_path))
    result = assemble(options).run(model)
    spec, config = spec_and_config(manifest)
    expect = Expectation.of(spec, config, options.skip_fusions)
    return model, _report(model, result, expect, options, sum(graph.op_counts.values()))


def _check(artifact: Path, manifest: Manifest, graph: GraphSpec, written: Path, check: bool) -> NumericCheck:
    if not check:
        return NumericCheck(False, "--no-check")
    spec, config = spec_and_config(manifest)
    with step("checking the optimized graph against the input in ONNX Runtime"):
        verdict = numeric_check(manifest, graph, spec, config, manifest.onnx_path(artifact, graph.name), written)
    if verdict.checked and not verdict.passed:
        name, err = verdict.worst()
        raise CheckFailed(
            f"optimized graph diverges from its input: {name} max relative error {err:.2e} > {verdict.tolerance:.0e}"
        )
    return verdict


def optimize(
    artifact: Path,
    out: Path,
    *,
    check: bool = True,
    force: bool = False,
    options: PipelineOptions | None = None,
    allow_missing_fusions: bool = False,
) -> Optimized:
    """Optimize every graph of `artifact` into the artifact `out`."""
    options = options or PipelineOptions()
    manifest = Manifest.read(artifact)
    results = {g.name: _optimize_graph(artifact, manifest, g, options) for g in manifest.graphs.values()}
    missing = [line for _model, report in results.values() for line in report.missing]
    if missing and not allow_missing_fusions:
        raise CheckFailed(
            "expected fusions missing: "
            + " | ".join(missing)
            + " (pass --allow-missing-fusions to write the graph anyway)"
        )
    for line in missing:
        logger.warning("expected fusion missing: %s", line)
    reports: dict[str, OptimizeReport] = {}
    with staged_output(out, force, reads=[artifact]) as stage:
        new = manifest
        for name, (model, report) in results.items():
            graph, reports[name] = _write_graph(stage, artifact, manifest, manifest.graphs[name], model, report, check)
            new = replace(new.with_graph(graph).with_passes(report.passes), opset=model.opset)
        new.write(stage)
        next(iter(reports.values())).write(stage / REPORT_NAME)
    return Optimized(str(artifact), str(out), reports)


def _write_graph(
    stage: Path, artifact: Path, manifest: Manifest, graph: GraphSpec, model: Model, report: OptimizeReport, check: bool
) -> tuple[GraphSpec, OptimizeReport]:
    """Save one optimized graph into the staging directory, check it, and describe it."""
    filename = Path(graph.onnx).name
    proto = model.to_onnx()
    with step(f"writing the optimized graph {filename}"):
        save_onnx(proto, stage, filename)
    verdict = _check(artifact, manifest, graph, stage / filename, check)
    data = f"{filename}.data"
    written = replace(
        graph,
        onnx=filename,
        external_data=[data] if (stage / data).exists() else [],
        op_counts=op_counts(proto),
        fusions=report.fusions,
        expected_fusions=report.expected,
    )
    return written, replace(report, numeric_check=verdict)
