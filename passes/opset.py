"""Opset upgrade: fused ops (Attention, RMSNormalization, RotaryEmbedding) need opset 23."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from llm2trt.core.errors import BackendError, first_line
from llm2trt.passes.manager import GraphPass, Model, PassResult, gs_quiet, reattach_weights, weightless


def ir_for_opset(opset: int) -> int:
    """The IR version of the onnx release that introduced `opset` (ONNX Runtime 1.31 reads IR up
    to 13 while onnx 1.23 writes 14 by default: so both are set explicitly)."""
    return min((ir for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset), default=10)


class OpsetUpgrade(GraphPass):
    """Convert the default-domain opset with ONNX's version converter (op semantics adapted)."""

    name = "opset_upgrade"

    def __init__(self, target: int) -> None:
        self.target = target

    def run(self, model: Model) -> PassResult:
        current = model.opset
        if current >= self.target:
            return PassResult(modified=False, counts={"from": current, "to": current})
        proto, weights = weightless(model.graph)
        try:
            converted = version_converter.convert_version(proto, self.target)
        except Exception as exc:  # the converter raises RuntimeError or its C++ errors
            raise BackendError(
                f"cannot convert the graph from opset {current} to {self.target}: {first_line(exc)}"
            ) from None
        converted.ir_version = max(converted.ir_version, ir_for_opset(self.target))
        _keep_local_functions(model.graph, converted, self.target)
        upgraded = Model.from_onnx(converted)
        reattach_weights(upgraded.graph, weights)
        # The converter writes attributes that became inputs (ReduceMean axes, ...) as Constant
        # nodes; fold them into constants so rules can read them.
        with gs_quiet():
            upgraded.graph.fold_constants(fold_shapes=False, error_ok=True)
            upgraded.graph.cleanup(remove_unused_graph_inputs=False)
        model.graph, model.ir_version = upgraded.graph, converted.ir_version
        model.forget_names()  # node names (and their metadata) carry over; the name registry does not
        return PassResult(modified=True, counts={"from": current, "to": self.target})


def _keep_local_functions(graph: gs.Graph, converted: onnx.ModelProto, opset: int) -> None:
    """The converter drops a graph's local functions and their domain's import: llm2trt's ops (the
    MoE op from the export) get their bodies back, written for the new opset."""
    from llm2trt.passes.moe import moe_function_proto
    from llm2trt.passes.ort_op_table import DOMAIN, MOE, VERSION

    names = {f.name for f in graph.functions if f.domain == DOMAIN}
    unknown = names - {MOE.name}
    if unknown:
        raise BackendError(f"cannot carry the local functions {sorted(unknown)} to opset {opset}")
    del converted.functions[:]
    if MOE.name in names:
        converted.functions.append(moe_function_proto(opset))
    if names and not any(o.domain == DOMAIN for o in converted.opset_import):
        converted.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
