"""Opset upgrade: fused ops (Attention, RMSNormalization, RotaryEmbedding) need opset 23."""

from __future__ import annotations

from onnx import version_converter

from llm2trt.errors import BackendError
from llm2trt.passes.core import GraphPass, Model, PassResult, gs_quiet, restore_weights, stash_weights

# ONNX Runtime 1.31 reads IR up to 13; opset 23 wants IR 11 (ENVIRONMENT.md: set both explicitly).
IR_FOR_OPSET = {23: 11}


class OpsetUpgrade(GraphPass):
    """Convert the default-domain opset with ONNX's version converter (op semantics adapted)."""

    name = "opset_upgrade"

    def __init__(self, target: int) -> None:
        self.target = target

    def run(self, model: Model) -> PassResult:
        current = model.opset
        if current >= self.target:
            return PassResult(modified=False, counts={"from": current, "to": current})
        proto = model.to_onnx()
        stashed = stash_weights(proto)
        try:
            converted = version_converter.convert_version(proto, self.target)
        except Exception as exc:  # the converter raises RuntimeError or its C++ errors
            raise BackendError(
                f"cannot convert the graph from opset {current} to {self.target}: "
                f"{str(exc).strip().splitlines()[0][:300]}"
            ) from None
        restore_weights(converted, stashed)
        converted.ir_version = max(converted.ir_version, IR_FOR_OPSET.get(self.target, 10))
        upgraded = Model.from_onnx(converted)
        # The converter writes new attributes-turned-inputs (ReduceMean axes, ...) as Constant
        # nodes; fold them into constants so rules can read them.
        with gs_quiet():
            upgraded.graph.fold_constants(fold_shapes=False, error_ok=True)
            upgraded.graph.cleanup(remove_unused_graph_inputs=False)
        upgraded.node_metadata.update(model.node_metadata)
        model.graph, model.node_metadata, model.ir_version = (
            upgraded.graph,
            upgraded.node_metadata,
            converted.ir_version,
        )
        return PassResult(modified=True, counts={"from": current, "to": self.target})
