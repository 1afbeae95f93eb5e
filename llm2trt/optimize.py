"""optimize: run the pass pipeline over an artifact, check the result numerically, write it out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llm2trt.artifact import check_artifact_files, check_output, load_onnx, save_onnx, staged_output
from llm2trt.errors import BackendError, CheckFailed
from llm2trt.export import op_counts, sample_tensors
from llm2trt.exporters import ExportSpec
from llm2trt.log import step
from llm2trt.manifest import REPORT_NAME, Manifest
from llm2trt.numerics import normwise_rel_err, run_ort
from llm2trt.passes.cleanup import ShapeInference, cleanup_passes
from llm2trt.passes.core import GraphPass, Model, PassManager
from llm2trt.passes.fusions import FUSED_OPS, count_fusions, required_opset, rules_for
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.pattern import RewritePass, layer_of, module_of

logger = logging.getLogger(__name__)

# Optimized vs input graph, both in ONNX Runtime: normwise relative error allowed, by dtype.
OPTIMIZE_RTOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}
CHECK_BATCH, CHECK_SEQUENCE = 2, 16


def numeric_check(manifest: Manifest, spec: ExportSpec, config: Any, before: Path, after: Path) -> dict[str, Any]:
    """Run both graphs in ONNX Runtime on the same inputs; the error per output and the verdict."""
    sequence = CHECK_SEQUENCE
    if "sequence" in manifest.dynamic_dims:
        sequence = min(sequence, manifest.dynamic_dims["sequence"].max)
    feeds = sample_tensors(spec, config, manifest.inputs, CHECK_BATCH, sequence, seed=1)
    tolerance = OPTIMIZE_RTOL[manifest.dtype]
    try:
        reference = run_ort(before, feeds)
    except BackendError as exc:
        return {"checked": False, "reason": f"the input graph does not run in ONNX Runtime here ({exc})"}
    outputs = run_ort(after, feeds)
    errors = {name: normwise_rel_err(outputs[name], ref) for name, ref in reference.items()}
    return {
        "checked": True,
        "tolerance": tolerance,
        "max_rel_err": errors,
        "passed": all(err <= tolerance for err in errors.values()),
        "batch": CHECK_BATCH,
        "sequence": sequence,
    }


def build_pipeline(skip_fusions: tuple[str, ...] | list[str] = ()) -> tuple[PassManager, list[RewritePass]]:
    """Cleanup, the opset the fused ops need, one rewrite pass per fusion, shape inference last."""
    groups = rules_for(skip_fusions)
    fusion_passes = [RewritePass(f"fuse_{name.lower()}", rules) for name, rules in groups.items()]
    passes: list[GraphPass] = [*cleanup_passes()]
    if groups:
        passes.append(OpsetUpgrade(required_opset(list(groups))))
    passes += [*fusion_passes, ShapeInference()]
    return PassManager(passes), fusion_passes


def missing_fusions(
    spec: ExportSpec,
    config: Any,
    model: Model,
    found: dict[str, int],
    expected: dict[str, int],
    refusals: list[dict[str, str]],
) -> list[str]:
    """One line per expected fusion that fell short: the layers without it and why."""
    layers = spec.num_layers(config)
    lines = []
    for fusion, want in expected.items():
        have = found.get(fusion, 0)
        if have >= want:
            continue
        per_layer, _extra = spec.fusions_per_layer[fusion]
        ops = FUSED_OPS[fusion]
        seen: dict[int, int] = {}
        for node in model.graph.nodes:
            if node.op in ops:
                layer = layer_of(module_of(node.name))
                if layer is not None:
                    seen[layer] = seen.get(layer, 0) + 1
        short = [i for i in range(layers) if seen.get(i, 0) < per_layer]
        reasons = [
            r for r in refusals if r["rule"].split(".")[0] == fusion and (not short or layer_of(r["module"]) in short)
        ]
        detail = "; ".join(f"{r['module'] or r['node']}: {r['reason']}" for r in reasons[:3]) or "no candidate matched"
        where = f"layers without it: {', '.join(map(str, short[:8]))}" if short else "outside the layers"
        lines.append(f"{fusion} {have}/{want} ({where}; {detail})")
    return lines


def optimize(
    artifact: Path,
    out: Path,
    *,
    check: bool = True,
    force: bool = False,
    skip_fusions: tuple[str, ...] | list[str] = (),
    allow_missing_fusions: bool = False,
) -> dict[str, Any]:
    manifest = Manifest.read(artifact)
    onnx_path = check_artifact_files(artifact)
    check_output(out, force, reads=[artifact])
    pipeline, fusion_passes = build_pipeline(skip_fusions)
    with step(f"loading {onnx_path}"):
        proto = load_onnx(onnx_path)
    model = Model.from_onnx(proto)
    del proto
    result = pipeline.run(model)
    found = count_fusions(model.graph)
    spec, config = manifest.spec_and_config()
    expected = {k: v for k, v in spec.expected_fusions(config).items() if k not in skip_fusions}
    # A candidate one rule refused that a later rule fused (a ReduceMean LayerNorm looked at, inside
    # an RMSNorm) is gone from the graph: only refusals at nodes still there explain anything.
    alive = {n.name for n in model.graph.nodes}
    refusals = [
        r for p in fusion_passes for r in result.results[p.name].details.get("refusals", []) if r["node"] in alive
    ]
    missing = missing_fusions(spec, config, model, found, expected, refusals)
    optimized = model.to_onnx()
    report: dict[str, Any] = {
        "fusions": found,
        "expected": expected,
        "skipped": sorted(skip_fusions),
        "missing": missing,
        "rules": {rule: count for p in fusion_passes for rule, count in result.results[p.name].counts.items()},
        "refusals": refusals,
        "passes": [
            {"name": r.name, "modified": r.modified, "counts": r.counts, "seconds": r.seconds} for r in result.records
        ],
        "nodes_before": sum(manifest.op_counts.values()),
        "nodes_after": len(optimized.graph.node),
        "opset": model.opset,
    }
    if missing and not allow_missing_fusions:
        raise CheckFailed(
            "expected fusions missing: "
            + " | ".join(missing)
            + " (pass --allow-missing-fusions to write the graph anyway)"
        )
    for line in missing:
        logger.warning("expected fusion missing: %s", line)
    with staged_output(out, force) as stage:
        with step("writing the optimized model"):
            save_onnx(optimized, stage)
        new_manifest = manifest.with_passes(result.records)
        new_manifest.op_counts = op_counts(optimized)
        new_manifest.opset = model.opset
        new_manifest.fusions = found
        new_manifest.expected_fusions = expected
        if check:
            with step("checking the optimized graph against the input in ONNX Runtime"):
                report["numeric_check"] = numeric_check(manifest, spec, config, onnx_path, stage / onnx_path.name)
            verdict = report["numeric_check"]
            if verdict["checked"] and not verdict["passed"]:
                worst = max(verdict["max_rel_err"].items(), key=lambda kv: kv[1])
                raise CheckFailed(
                    f"optimized graph diverges from its input: {worst[0]} max relative error "
                    f"{worst[1]:.2e} > {verdict['tolerance']:.0e}"
                )
        else:
            report["numeric_check"] = {"checked": False, "reason": "--no-check"}
        new_manifest.write(stage)
        (stage / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report
