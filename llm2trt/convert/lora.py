"""convert --lora: PEFT LoRA adapters merged into the loaded transformers model's weights.

Each adapter's layers add `scale * B @ A` to their base weight (transposed for layers that store
[in, out], GPT-2's Conv1D; an embedding's pair as PEFT's embedding LoRA), in float64 then rounded to
the weight's dtype once; `modules_to_save` parameters replace the base ones (a tied output head is
untied first, so the embedding keeps its own weights). Adapters merge in the order given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural, step
from llm2trt.core.lora import AdapterRecord, LoraAdapter, parse_adapter_arg, read_adapter

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def read_adapters(values: Sequence[str]) -> list[LoraAdapter]:
    """`--lora` values (`DIR` or `NAME=DIR`), read and checked before the model loads."""
    adapters = []
    for value in values:
        name, path = parse_adapter_arg(value)
        adapters.append(read_adapter(path, name))
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise InputError(f"--lora: two adapters share a name ({', '.join(names)}); name them NAME=DIR")
    return adapters


def merge_adapters(model: torch.nn.Module, adapters: Sequence[LoraAdapter]) -> list[AdapterRecord]:
    """Merge every adapter into `model` in place; their records, for the manifest."""
    import torch

    for adapter in adapters:
        with step(f"merging adapter {adapter.name} ({plural(len(adapter.layers), 'LoRA layer')})"):
            modules = dict(model.named_modules())
            for module_name, layer in adapter.layers.items():
                module = modules.get(module_name)
                weight = getattr(module, "weight", None) if module is not None else None
                if not isinstance(weight, torch.Tensor):
                    raise InputError(f"adapter {adapter.name}: the model has no layer {module_name} with a weight")
                delta = torch.from_numpy(layer.delta()).to(torch.float64)
                if adapter.fan_in_fan_out and not layer.embedding:
                    delta = delta.T
                if tuple(delta.shape) != tuple(weight.shape):
                    raise InputError(
                        f"adapter {adapter.name}: {module_name}'s update is {list(delta.shape)} but its weight is "
                        f"{list(weight.shape)} (an adapter for another model?)"
                    )
                with torch.no_grad():
                    weight.copy_((weight.to(torch.float64) + delta).to(weight.dtype))
            for param_name, value in adapter.saved.items():
                _replace(model, adapter.name, param_name, torch.from_numpy(value))
    return [a.record for a in adapters]


def _replace(model: torch.nn.Module, adapter: str, param_name: str, value: torch.Tensor) -> None:
    """A modules_to_save parameter replaces the base one (a tied one becomes the module's own)."""
    import torch

    module_name, _, attr = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    current = getattr(module, attr, None) if module is not None else None
    if not isinstance(current, torch.Tensor):
        raise InputError(f"adapter {adapter}: the model has no parameter {param_name} to replace (modules_to_save)")
    if tuple(current.shape) != tuple(value.shape):
        raise InputError(
            f"adapter {adapter}: {param_name} is {list(value.shape)} in the adapter but {list(current.shape)} "
            "in the model (an adapter for another model?)"
        )
    tied = any(p is current for n, p in model.named_parameters(remove_duplicate=False) if n != param_name)
    new = torch.nn.Parameter(value.to(current.dtype).clone(), requires_grad=False)
    setattr(module, attr, new)  # a new parameter: a weight tied to it (the embedding) keeps its own values
    if tied:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # the export must not tie them again
        logger.info("adapter %s: %s untied from the weight it shared", adapter, param_name)
