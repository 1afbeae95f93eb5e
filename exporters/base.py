"""Declarative export specs: one registered spec per architecture, mostly attributes.

Inheritance is kept shallow: `ExportSpec` holds the machinery, `DecoderSpec` / `TextEncoderSpec` /
`VisionEncoderSpec` say what a family's graph looks like, and each architecture only sets its
names, its tiny config and what it expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from llm2trt.errors import InputError
from llm2trt.kv import KVLayout
from llm2trt.manifest import DimRange, TensorSpec

BATCH = "batch"
SEQUENCE = "sequence"


@dataclass(frozen=True)
class TaskDecl:
    """What one transformers class exports: its task and its outputs (the first is the main one)."""

    task: str
    outputs: tuple[str, ...]


class ExportSpec:
    """How to export one architecture. Subclasses set the class attributes below."""

    name: ClassVar[str]
    # The config `model_type` values this spec takes (Llama's takes Mistral and Qwen2 too).
    model_types: ClassVar[tuple[str, ...]]
    # transformers config class and kwargs of the built-in `tiny:<name>` model.
    config_class: ClassVar[str]
    tiny_config: ClassVar[Mapping[str, Any]]
    # transformers model class -> what it exports; `default_class` when config.architectures is silent.
    classes: ClassVar[Mapping[str, TaskDecl]]
    default_class: ClassVar[str]
    # Inputs in graph order: name -> (dtype, symbolic shape).
    inputs: ClassVar[Mapping[str, tuple[str, tuple[str, ...]]]]
    # Extra keyword arguments to the model's forward during export.
    forward_kwargs: ClassVar[Mapping[str, Any]] = {}
    # Default optimization-profile ranges per symbolic dim (min, opt, max); `max_sequence`
    # is further capped by the config's position limit.
    default_dims: ClassVar[Mapping[str, tuple[int, int, int]]] = {BATCH: (1, 1, 8), SEQUENCE: (1, 128, 1024)}
    # Fusions the optimized graph must contain: fusion -> (per layer, extra). Missing ones fail
    # `optimize` loudly instead of shipping a slow graph.
    fusions_per_layer: ClassVar[Mapping[str, tuple[int, int]]] = {}

    # -- what the graph looks like ------------------------------------------------------------

    def model_class(self, config: Any) -> str:
        for arch in getattr(config, "architectures", None) or []:
            if arch in self.classes:
                return str(arch)
        return self.fallback_class(config)

    def fallback_class(self, config: Any) -> str:
        """The class to export when config.architectures names none this spec knows."""
        return self.default_class

    def task(self, config: Any) -> TaskDecl:
        return self.classes[self.model_class(config)]

    def input_specs(self, config: Any, float_dtype: str) -> list[TensorSpec]:
        return [TensorSpec(name, dtype, list(shape)) for name, (dtype, shape) in self.inputs.items()]

    def output_specs(self, config: Any, float_dtype: str) -> list[TensorSpec]:
        return [TensorSpec(name, float_dtype, self.output_shape(config, name)) for name in self.task(config).outputs]

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        raise NotImplementedError

    def kv_layout(self, config: Any) -> KVLayout | None:
        return None

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def expected_fusions(self, config: Any) -> dict[str, int]:
        layers = self.num_layers(config)
        return {name: per * layers + extra for name, (per, extra) in self.fusions_per_layer.items()}

    def position_limit(self, config: Any) -> int | None:
        return getattr(config, "max_position_embeddings", None)

    def dim_ranges(self, config: Any) -> dict[str, DimRange]:
        ranges = {}
        limit = self.position_limit(config)
        for dim, (lo, opt, hi) in self.default_dims.items():
            cap = int(limit) if dim == SEQUENCE and limit else hi
            ranges[dim] = DimRange(lo, min(opt, cap), min(hi, cap))
        return ranges

    # -- what the exporter feeds it ----------------------------------------------------------

    def sample_inputs(self, config: Any, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs for tracing and comparison; the last row is right-padded to exercise masks."""
        rng = np.random.default_rng(seed)
        feeds: dict[str, np.ndarray] = {}
        for name, (dtype, _shape) in self.inputs.items():
            feeds[name] = self.sample_input(config, name, dtype, batch, sequence, rng)
        return feeds

    def sample_input(
        self, config: Any, name: str, dtype: str, batch: int, sequence: int, rng: np.random.Generator
    ) -> np.ndarray:
        if name == "input_ids":
            return rng.integers(0, config.vocab_size, size=(batch, sequence), dtype=np.int64)
        if name == "attention_mask":
            mask = np.ones((batch, sequence), dtype=np.int64)
            if batch > 1 and sequence > 2:
                mask[-1, -(sequence // 4 or 1) :] = 0
            return mask
        if name == "position_ids":
            return np.broadcast_to(np.arange(sequence, dtype=np.int64), (batch, sequence)).copy()
        if name == "token_type_ids":
            types = np.zeros((batch, sequence), dtype=np.int64)
            types[:, sequence // 2 :] = 1
            return types
        raise NotImplementedError(f"{type(self).__name__} has no sample for input {name!r}")

    # -- the built-in tiny model ---------------------------------------------------------------

    def make_tiny_config(self) -> Any:
        import transformers

        config = getattr(transformers, self.config_class)(**self.tiny_config)
        config.architectures = [self.default_class]
        return config

    def check_config(self, config: Any) -> None:
        """Refuse configs this spec cannot export, naming the cause."""


class DecoderSpec(ExportSpec):
    """Causal language models: token ids in, logits out; a KV cache of (batch, heads, seq, dim)."""

    inputs: ClassVar[Mapping[str, tuple[str, tuple[str, ...]]]] = {
        "input_ids": ("int64", (BATCH, SEQUENCE)),
        "attention_mask": ("int64", (BATCH, SEQUENCE)),
        "position_ids": ("int64", (BATCH, SEQUENCE)),
    }
    forward_kwargs: ClassVar[Mapping[str, Any]] = {"use_cache": False}

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        if output == "logits":
            return [BATCH, SEQUENCE, int(config.vocab_size)]
        return [BATCH, SEQUENCE, int(config.hidden_size)]

    def kv_layout(self, config: Any) -> KVLayout:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return KVLayout(
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
        )


class TextEncoderSpec(ExportSpec):
    """Bidirectional text encoders: ids, mask and segment ids in; hidden states out."""

    inputs: ClassVar[Mapping[str, tuple[str, tuple[str, ...]]]] = {
        "input_ids": ("int64", (BATCH, SEQUENCE)),
        "attention_mask": ("int64", (BATCH, SEQUENCE)),
        "token_type_ids": ("int64", (BATCH, SEQUENCE)),
    }

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        if output == "pooler_output":
            return [BATCH, int(config.hidden_size)]
        if output == "logits":
            return [BATCH, SEQUENCE, int(config.vocab_size)]
        return [BATCH, SEQUENCE, int(config.hidden_size)]


class VisionEncoderSpec(ExportSpec):
    """Vision transformers: a fixed-size image in (only the batch is dynamic)."""

    default_dims: ClassVar[Mapping[str, tuple[int, int, int]]] = {BATCH: (1, 1, 8)}

    def input_specs(self, config: Any, float_dtype: str) -> list[TensorSpec]:
        size = int(config.image_size)
        return [TensorSpec("pixel_values", float_dtype, [BATCH, int(config.num_channels), size, size])]

    def num_tokens(self, config: Any) -> int:
        return (int(config.image_size) // int(config.patch_size)) ** 2 + 1

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        if output == "logits":
            return [BATCH, len(getattr(config, "id2label", {}) or {}) or int(config.num_labels)]
        if output == "pooler_output":
            return [BATCH, int(config.hidden_size)]
        return [BATCH, self.num_tokens(config), int(config.hidden_size)]

    def position_limit(self, config: Any) -> int | None:
        return None

    def sample_inputs(self, config: Any, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        size = int(config.image_size)
        pixels = rng.standard_normal((batch, int(config.num_channels), size, size)).astype(np.float32)
        return {"pixel_values": pixels}


def require(condition: bool, message: str) -> None:
    """Config checks raise a user-facing error, not an assert."""
    if not condition:
        raise InputError(message)
