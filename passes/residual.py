"""A half-precision decoder's residual stream kept in float32.

Models that normalize each sublayer's output before adding it to the residual (Gemma 3's post-attention
and post-feedforward norms) grow that stream past fp16's range: Gemma 3 270M's peaks near 104,000 on a
`<bos>`-led prompt, over fp16's 65,504, and the sum turns to inf. Their norms already compute in float32
(Cast up, normalize, Cast down), so the rewrite adds the float32 norm output to a float32 residual and
lets the next norm read it without its upcast; the matrix products stay fp16.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType, onnx_elem_type
from llm2trt.passes.manager import GraphPass, Model, PassResult

_FLOAT, _HALF = DType.FP32.onnx, DType.FP16.onnx
_FLOAT_NUMPY = DType.FP32.numpy


def _cast_to(node: gs.Node | None, to: int) -> bool:
    return node is not None and node.op == "Cast" and node.attrs.get("to") == to


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _float32(tensor: gs.Tensor) -> bool:
    return onnx_elem_type(tensor.dtype) == _FLOAT


class Float32Residual(GraphPass):
    """Residual Adds of a downcast float32 branch (`Add(r, Cast<fp16>(x32))`, the sum also read by an
    upcast) become float32 Adds; the upcasts of their sums read the float32 sum directly. Needs the
    graph typed (shape inference) to know the branch is float32."""

    name = "float32_residual"

    def run(self, model: Model) -> PassResult:
        graph = model.graph
        wide: dict[str, gs.Variable] = {}  # an fp16 residual tensor's name -> its float32 sum
        sums: list[tuple[gs.Variable, gs.Variable]] = []  # (the fp16 sum, its float32 twin)
        upcasts = 0
        for node in list(graph.nodes):  # topological: a stream's earlier Adds come first
            branch = self._branch(node, wide)
            if branch is None:
                continue
            [out] = node.outputs
            residual = node.inputs[1 - node.inputs.index(branch.outputs[0])]
            wide_residual = wide.get(residual.name) or self._upcast(model, residual)
            total = gs.Variable(model.fresh_name(f"{out.name}.f32"), dtype=_FLOAT_NUMPY, shape=out.shape)
            node.inputs = [wide_residual, branch.inputs[0]]
            node.outputs = [total]
            # Whatever else reads the sum in fp16 keeps reading it, through one downcast.
            down = model.fresh_name(f"{node.name}/to_fp16")
            graph.nodes.append(gs.Node("Cast", down, {"to": _HALF}, [total], [out]))
            wide[out.name] = total
            sums.append((out, total))
        for out, total in sums:
            for reader in [c for c in out.outputs if _cast_to(c, _FLOAT)]:
                [upcast] = reader.outputs
                for consumer in list(upcast.outputs):
                    consumer.inputs[consumer.inputs.index(upcast)] = total
                upcasts += 1
        if sums:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(sums), counts={"float32_adds": len(sums), "upcasts_dropped": upcasts})

    @staticmethod
    def _branch(node: gs.Node, wide: dict[str, gs.Variable]) -> gs.Node | None:
        """The downcast float32 operand of a residual Add whose sum a norm reads in float32 (the
        other operand: the residual, maybe an earlier Add's sum, now itself a downcast)."""
        if node.op != "Add" or len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        if not any(_cast_to(c, _FLOAT) for c in node.outputs[0].outputs):
            return None
        operands = [t for t in node.inputs if t.name not in wide]
        casts = [p for p in map(_producer, operands) if p is not None and _cast_to(p, _HALF) and _float32(p.inputs[0])]
        if len(casts) != 1 or onnx_elem_type(node.outputs[0].dtype) not in (_HALF, None):
            return None
        other = node.inputs[1 - node.inputs.index(casts[0].outputs[0])]
        return casts[0] if onnx_elem_type(other.dtype) in (_HALF, None) else None

    @staticmethod
    def _upcast(model: Model, tensor: gs.Tensor) -> gs.Variable:
        """The stream's start (the scaled embedding) in float32."""
        wide = gs.Variable(model.fresh_name(f"{tensor.name}.f32"), dtype=_FLOAT_NUMPY, shape=tensor.shape)
        name = model.fresh_name(f"{tensor.name}/to_fp32")
        model.graph.nodes.append(gs.Node("Cast", name, {"to": _FLOAT}, [tensor], [wide]))
        return wide
