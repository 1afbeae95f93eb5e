"""Opset upgrade: fused ops (Attention, RMSNormalization, RotaryEmbedding) need opset 23."""

from __future__ import annotations

import onnx
from llm2trt.passes.cleanup import gs_quiet
from llm2trt.passes.core import GraphPass, Model, PassResult
from onnx import version_converter

from llm2trt.errors import BackendError

_STASH_BYTES = 1024
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
        # The converter serializes the model; keep the weights out of it (only dims matter).
        stashed: dict[str, bytes] = {}
        for tensor in proto.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= _STASH_BYTES:
                stashed[tensor.name] = tensor.raw_data
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", "stashed-by-llm2trt"
        try:
            converted = version_converter.convert_version(proto, self.target)
        except Exception as exc:  # the converter raises RuntimeError or its C++ errors
            raise BackendError(
                f"cannot convert the graph from opset {current} to {self.target}: "
                f"{str(exc).strip().splitlines()[0][:300]}"
            ) from None
        for tensor in converted.graph.initializer:
            if tensor.name in stashed:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = stashed[tensor.name]
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
