"""Fake quantization of a transformers model with llm2trt's NumPy reference (`llm2trt.passes.quant_math`):
what a quantized graph must compute, for tests/passes/test_quant.py and scripts/quant_sensitivity.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llm2trt.core.dtypes import DType
from llm2trt.passes import quant_math as q
from llm2trt.passes.quant_methods import QuantMethod

Folds = list[tuple[str, str, int | None]]  # (module, parameter, axis) divided by s; axis None: a vector
# Modules sharing one input, and where SmoothQuant folds 1/s, as the pass must.
GROUPS: dict[str, list[tuple[list[str], Folds]]] = {
    "llama": [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [("input_layernorm", "weight", None)]),
        (["self_attn.o_proj"], []),
        (["mlp.gate_proj", "mlp.up_proj"], [("post_attention_layernorm", "weight", None)]),
        (["mlp.down_proj"], [("mlp.up_proj", "weight", 0)]),  # nn.Linear [out, in]: its output rows
    ],
    "gpt2": [
        (["attn.c_attn"], [("ln_1", "weight", None), ("ln_1", "bias", None)]),
        (["attn.c_proj"], []),
        (["mlp.c_fc"], [("ln_2", "weight", None), ("ln_2", "bias", None)]),
        (["mlp.c_proj"], []),
    ],
}
PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}


def weight_in_out(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as [in, out] (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out])."""
    return module.weight.T if isinstance(module, torch.nn.Linear) else module.weight


def set_weight_in_out(module: torch.nn.Module, w: np.ndarray) -> None:
    value = torch.from_numpy(np.ascontiguousarray(w.T if isinstance(module, torch.nn.Linear) else w))
    module.weight.data = value.to(module.weight.dtype)


def migrate(model: torch.nn.Module, base: str, mods: list[torch.nn.Module], folds: Folds, s: np.ndarray) -> None:
    """SmoothQuant's migration, exact in high precision: weight rows times s, 1/s folded upstream."""
    for m in mods:
        set_weight_in_out(m, weight_in_out(m).detach().numpy().astype(np.float32) * s[:, None])
    for owner, attr, axis in folds:
        p = getattr(model.get_submodule(f"{base}.{owner}"), attr)
        p.data = p.data / torch.from_numpy(s).reshape((-1, 1) if axis == 0 else (-1,))


def fake_quantize(mods: list[torch.nn.Module], method: QuantMethod, group: int, act_scale: float | None) -> list[Any]:
    """Weights through the reference's codes; the input, when a scale is given, through a static
    per-tensor Q/DQ hook. Returns the hooks."""
    for m in mods:
        set_weight_in_out(m, q.fake_quant_weight(weight_in_out(m).detach().numpy(), method, group))
    act = method.activations
    if act is None or act_scale is None:
        return []
    return [m.register_forward_pre_hook(act_quant(act_scale, act)) for m in mods]


def act_quant(scale: float, dtype: DType) -> Any:
    def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(q.fake_quant_values(args[0].numpy(), scale, dtype)),)

    return hook
