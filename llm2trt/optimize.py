"""optimize: run the pass pipeline over an artifact, check the result numerically, write it out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llm2trt.artifact import check_artifact_files, check_output, load_onnx, save_onnx, staged_output
from llm2trt.errors import BackendError, CheckFailed
from llm2trt.export import op_counts, sample_tensors
from llm2trt.log import step
from llm2trt.manifest import REPORT_NAME, Manifest
from llm2trt.numerics import normwise_rel_err, run_ort
from llm2trt.passes.cleanup import cleanup_passes
from llm2trt.passes.core import Model, PassManager

logger = logging.getLogger(__name__)

# Optimized vs input graph, both in ONNX Runtime: normwise relative error allowed, by dtype.
OPTIMIZE_RTOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}
CHECK_BATCH, CHECK_SEQUENCE = 2, 16


def numeric_check(manifest: Manifest, before: Path, after: Path) -> dict[str, Any]:
    """Run both graphs in ONNX Runtime on the same inputs; the error per output and the verdict."""
    spec, config = manifest.spec_and_config()
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


def optimize(artifact: Path, out: Path, *, check: bool = True, force: bool = False) -> dict[str, Any]:
    manifest = Manifest.read(artifact)
    onnx_path = check_artifact_files(artifact)
    check_output(out, force, reads=[artifact])
    with step(f"loading {onnx_path}"):
        proto = load_onnx(onnx_path)
    model = Model.from_onnx(proto)
    del proto
    pipeline = PassManager(cleanup_passes())
    result = pipeline.run(model)
    optimized = model.to_onnx()
    report: dict[str, Any] = {
        "fusions": {},
        "expected": {},
        "passes": [
            {"name": r.name, "modified": r.modified, "counts": r.counts, "seconds": r.seconds} for r in result.records
        ],
        "nodes_before": sum(manifest.op_counts.values()),
        "nodes_after": len(optimized.graph.node),
    }
    with staged_output(out, force) as stage:
        with step("writing the optimized model"):
            save_onnx(optimized, stage)
        new_manifest = manifest.with_passes(result.records)
        new_manifest.op_counts = op_counts(optimized)
        if check:
            with step("checking the optimized graph against the input in ONNX Runtime"):
                report["numeric_check"] = numeric_check(manifest, onnx_path, stage / onnx_path.name)
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
