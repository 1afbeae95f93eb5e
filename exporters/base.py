"""Declarative export specs: one registered spec per architecture, mostly attributes.

Inheritance is kept shallow: `ExportSpec` holds the machinery, `DecoderSpec` / `TextEncoderSpec` /
`VisionEncoderSpec` say what a family's graphs look like, and each architecture only sets its
names, its tiny config and what it expects.

A spec declares the graphs an artifact of its architecture can hold (`GraphVariant`: inputs,
outputs, whether it carries a KV cache); `graph_spec` turns one into the manifest's `GraphSpec`
for a config and dtype, and `sample_inputs` makes inputs for any such graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.kv import (
    BATCH,
    CACHE_SEQUENCE,
    FIXED,
    GQA,
    GROWING,
    PAST_SEQUENCE,
    SEQLENS_K,
    SEQUENCE,
    TOTAL_SEQUENCE,
    TOTAL_SEQUENCE_LENGTH,
    KVForm,
    KVLayout,
)
from llm2trt.core.lora import NO_ADAPTER
from llm2trt.core.manifest import DimRange, GraphSpec, TensorSpec
from llm2trt.core.tp import Heads, LayerSplit, Split, TPPlan, Units
from llm2trt.core.tp import Mapping as TPMapping

# An input declaration: its dtype (None: the model's float dtype) and symbolic shape.
InputDecl = tuple[DType | None, tuple[str, ...]]


@dataclass(frozen=True)
class SampleShape:
    """The sizes of one set of sample inputs: `past` tokens already in the cache (KV graphs)."""

    batch: int
    sequence: int
    past: int = 0
    cache: int = 0  # slots of a fixed-size cache buffer (>= past + sequence)


Sampler = Callable[[Any, SampleShape, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class TaskDecl:
    """What one transformers class exports: its task and its outputs (the first is the main one)."""

    task: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class GraphVariant:
    """One graph an artifact can hold: its inputs, in graph order (outputs come from the task),
    and the form of its KV cache (None: no cache). The cache's tensors follow the inputs and the
    outputs, named by llm2trt.core.kv."""

    name: str
    inputs: Mapping[str, InputDecl]
    kv_form: KVForm | None = None
    exported: bool = True  # False: only a pass makes it (convert never writes it directly)


def _input_ids(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, config.vocab_size, size=(shape.batch, shape.sequence), dtype=np.int64)


def _attention_mask(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    # Over the cached tokens too. The last row's newest tokens are padding, so masks are exercised
    # (right padding: every query still sees a token, as in real batches).
    total = shape.past + shape.sequence
    mask = np.ones((shape.batch, total), dtype=np.int64)
    if shape.batch > 1 and shape.sequence > 2:
        mask[-1, -(shape.sequence // 4 or 1) :] = 0
    return mask


def _position_ids(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    positions = np.arange(shape.past, shape.past + shape.sequence, dtype=np.int64)
    return np.broadcast_to(positions, (shape.batch, shape.sequence)).copy()


def _token_type_ids(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    types = np.zeros((shape.batch, shape.sequence), dtype=np.int64)
    types[:, shape.sequence // 2 :] = 1
    return types


def _seqlens_k(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    return np.full((shape.batch,), shape.past + shape.sequence - 1, dtype=np.int32)


def _total_sequence_length(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(shape.past + shape.sequence, dtype=np.int32)


def _pixel_values(config: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    size = int(config.image_size)
    return rng.standard_normal((shape.batch, int(config.num_channels), size, size)).astype(np.float32)


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
    # The graphs an artifact of this architecture can hold; the first is what `convert` writes.
    variants: ClassVar[tuple[GraphVariant, ...]]
    # How to make a sample of each input, by input name.
    samplers: ClassVar[Mapping[str, Sampler]] = {
        "input_ids": _input_ids,
        "attention_mask": _attention_mask,
        "position_ids": _position_ids,
        "token_type_ids": _token_type_ids,
        "pixel_values": _pixel_values,
        SEQLENS_K: _seqlens_k,
        TOTAL_SEQUENCE_LENGTH: _total_sequence_length,
    }
    # The attention implementations transformers offers for this architecture, preferred first.
    attn_implementations: ClassVar[tuple[str, ...]] = ("sdpa", "eager")
    # Cache forms the architecture cannot take, and why (`inspect`, the refusal, the support table).
    kv_forms_refused: ClassVar[Mapping[str, str]] = {}
    # Extra keyword arguments to the model's forward during export.
    forward_kwargs: ClassVar[Mapping[str, Any]] = {}
    # An fp16 export keeps the residual stream in float32 (the float32_residual pass): for models
    # whose normalized sublayer outputs add up past fp16's range.
    fp16_residual_in_float32: ClassVar[bool] = False
    # Mixture of experts: the classes of transformers' experts modules, each traced as one
    # llm2trt.MoE node (convert/patches.py experts_for_export).
    expert_classes: ClassVar[tuple[str, ...]] = ()
    # Default optimization-profile ranges per symbolic dim (min, opt, max); `max_sequence`
    # is further capped by the config's position limit.
    default_dims: ClassVar[Mapping[str, tuple[int, int, int]]] = {BATCH: (1, 1, 8), SEQUENCE: (1, 128, 1024)}
    # Fusions the optimized graph must contain: fusion -> (per layer, extra). Missing ones fail
    # `optimize` loudly instead of shipping a slow graph.
    fusions_per_layer: ClassVar[Mapping[str, tuple[int, int]]] = {}
    # Tensor parallelism: how each linear layer and embedding splits over ranks, by the last parts
    # of its module name (q_proj, attn.c_attn). Empty: the architecture cannot be split yet.
    tp_splits: ClassVar[Mapping[str, Split]] = {}
    # How a split layer's features group into heads (the rest split evenly).
    tp_units: ClassVar[Mapping[str, Units]] = {}

    def export_config(self, config: Any) -> Any:
        """The config of the model that is exported: the checkpoint's own, unless it holds a tower of
        a larger model (Gemma 3's multimodal checkpoint: its text config)."""
        return config

    def from_pretrained(self, cls: Any, location: str, config: Any, **kwargs: Any) -> Any:
        """Load the exported model class from a Hugging Face directory; a weight the checkpoint lacks
        is refused (transformers would fill it with random values and say so only in its log)."""
        model, info = cls.from_pretrained(location, config=config, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{location}: the checkpoint lacks the weight {missing[0]}{more}")
        return model

    def attention(self, requested: str) -> str:
        """The implementation to load with: the one asked for where the architecture has it, else
        its own (BLOOM has eager attention only)."""
        return requested if requested in self.attn_implementations else self.attn_implementations[0]

    def split_of(self, module: str) -> Split | None:
        """The declared split of a module (model.layers.3.self_attn.q_proj -> COLUMN), if any."""
        for suffix, split in self.tp_splits.items():
            if module == suffix or module.endswith("." + suffix):
                return split
        return None

    def check_tp(self, config: Any, tp: int) -> None:
        """Refuse, in one line naming the numbers, a tp this model cannot be split into."""
        if tp > 1 and not self.tp_splits:
            raise InputError(f"--tp {tp}: {self.name} declares no tensor-parallel split")

    def experts(self, config: Any) -> tuple[int, int] | None:
        """A mixture of experts' expert count and per-expert intermediate size (None: no experts)."""
        return None

    def tp_plan(self, config: Any, mapping: TPMapping) -> TPPlan:
        """The rewrite's plan for one rank (after `check_tp`)."""
        raise InputError(f"--tp {mapping.tp}: {self.name} declares no tensor-parallel split")

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

    def variant(self, name: str | None = None) -> GraphVariant:
        if name is None:
            return self.variants[0]
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants)
        raise InputError(f"{self.name} has no graph variant {name!r}; it has {known}")

    def default_variant(self, kv_cache: bool = True) -> str:
        """What `convert` exports: the first exportable variant, or the first without a cache."""
        exportable = [v for v in self.variants if v.exported]
        if kv_cache:
            return exportable[0].name
        return next(v.name for v in exportable if v.kv_form is None)

    def variant_for(self, kv_form: KVForm | None, config: Any = None) -> str:
        """The variant whose cache has this form (None: without a cache), unless this config's
        model cannot take that form."""
        why = self.refused_kv_forms(config).get(kv_form or "", "") if config is not None else ""
        for variant in self.variants:
            if variant.kv_form == kv_form and not why:
                return variant.name
        why = why or self.kv_forms_refused.get(kv_form or "", "")
        raise InputError(f"{self.name} has no graph with a {kv_form or 'no'} KV cache" + (f": {why}" if why else ""))

    @property
    def kv_forms(self) -> tuple[KVForm, ...]:
        """The cache forms this architecture's graphs can take."""
        return tuple(v.kv_form for v in self.variants if v.kv_form is not None)

    def refused_kv_forms(self, config: Any) -> dict[str, str]:
        """Cache forms this config's model cannot take, and why (a transformers config or the
        manifest's `model_config` mapping)."""
        return dict(self.kv_forms_refused)

    def kv_forms_for(self, config: Any) -> tuple[KVForm, ...]:
        refused = self.refused_kv_forms(config)
        return tuple(form for form in self.kv_forms if form not in refused)

    def cache_refill_length(self, config: Mapping[str, Any]) -> int | None:
        """The length at which transformers' generate drops the cache and runs the whole sequence
        again (None: never); `config` is the manifest's `model_config`."""
        return None

    def graph_spec(self, config: Any, dtype: DType, variant: str | None = None) -> GraphSpec:
        """The manifest's description of one graph variant for this config, in `dtype`."""
        decl = self.variant(variant)
        inputs = [
            TensorSpec(name, in_dtype or dtype, self.input_shape(config, name, shape))
            for name, (in_dtype, shape) in decl.inputs.items()
        ]
        outputs = [TensorSpec(name, dtype, self.output_shape(config, name)) for name in self.task(config).outputs]
        layout = self.kv_layout(config)
        kv = replace(layout, form=decl.kv_form) if decl.kv_form and layout is not None else None
        if kv is not None:
            inputs += [TensorSpec(name, dtype, shape) for name, shape in kv.past_shapes()]
            outputs += [TensorSpec(name, dtype, shape) for name, shape in kv.present_shapes()]
        symbolic = {d for t in inputs for d in t.symbolic_dims()}
        dims = {k: v for k, v in self.dim_ranges(config).items() if k in symbolic}
        return GraphSpec(decl.name, inputs, outputs, outputs[0].name, dims, kv)

    def input_shape(self, config: Any, name: str, declared: tuple[str, ...]) -> list[int | str]:
        """An input's shape: the declared symbolic dims, unless the config fixes some."""
        return list(declared)

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
            cap = int(limit) if dim in _POSITION_DIMS and limit else hi
            ranges[dim] = DimRange(lo, min(opt, cap), min(hi, cap))
        return ranges

    # -- what the exporter and the checks feed it ----------------------------------------------

    def sample_inputs(
        self, config: Any, graph: GraphSpec, batch: int, sequence: int, seed: int = 0, past: int | None = None
    ) -> dict[str, np.ndarray]:
        """Inputs of `graph` for tracing and comparison, in the graph's dtypes. A KV graph gets
        `past` cached tokens (by default half the sequence, at least one)."""
        rng = np.random.default_rng(seed)
        shape = SampleShape(batch, sequence)
        if graph.kv_cache is not None:
            # GroupQueryAttention takes several new tokens per row only from an empty cache.
            default = 0 if graph.kv_cache.form == GQA else max(1, sequence // 2)
            past = default if past is None else past
            shape = SampleShape(batch, sequence, past, past + sequence)
        cache = set(graph.kv_cache.past_names) if graph.kv_cache else set()
        # Runtime LoRA: empty slots and no row on them, so every runner computes the base model
        # (the transformers reference has no adapters); the adapters' path is PEFT's to check.
        adapters = graph.lora.pack(()) if graph.lora is not None else {}
        feeds: dict[str, np.ndarray] = {}
        for tensor in graph.inputs:
            sampler = self.samplers.get(tensor.name)
            if tensor.name in cache:
                value = _cache_sample(graph.kv_cache, shape, rng)
            elif graph.lora is not None and tensor.name == graph.lora.slot_input:
                value = np.full(batch, NO_ADAPTER, dtype=np.int64)
            elif tensor.name in adapters:
                value = adapters[tensor.name]
            elif sampler is not None:
                value = sampler(config, shape, rng)
            else:
                raise NotImplementedError(f"{type(self).__name__} has no sample for input {tensor.name!r}")
            feeds[tensor.name] = tensor.dtype.cast(value)
        return feeds

    # -- the built-in tiny model ---------------------------------------------------------------

    def make_tiny_config(self) -> Any:
        import transformers

        config = getattr(transformers, self.config_class)(**self.tiny_config)
        config.architectures = [self.default_class]
        return config

    def check_config(self, config: Any) -> None:
        """Refuse configs this spec cannot export, naming the cause."""


_TEXT_IDS: dict[str, InputDecl] = {"input_ids": (DType.INT64, (BATCH, SEQUENCE))}
_MASK: dict[str, InputDecl] = {"attention_mask": (DType.INT64, (BATCH, SEQUENCE))}
_POSITIONS: dict[str, InputDecl] = {"position_ids": (DType.INT64, (BATCH, SEQUENCE))}
# Dims that count token positions: their ranges are capped by the model's position limit.
_POSITION_DIMS = (SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE, CACHE_SEQUENCE)


def _cache_sample(kv: Any, shape: SampleShape, rng: np.random.Generator) -> np.ndarray:
    """Cached keys or values: `past` tokens in a growing cache, a buffer of `cache` slots in a fixed one
    (slots past the valid ones hold garbage, as a real buffer would)."""
    length = shape.cache if kv.is_buffer else shape.past
    return rng.standard_normal((shape.batch, kv.num_kv_heads, length, kv.head_dim)).astype(np.float32)


class DecoderSpec(ExportSpec):
    """Causal language models: token ids in, logits out; a KV cache of (batch, heads, seq, dim)."""

    variants: ClassVar[tuple[GraphVariant, ...]] = (
        # One graph for prefill and decode: the mask spans cached and new tokens, positions are given
        # (left padding), the cache goes in and comes out (names from llm2trt.core.kv).
        GraphVariant(
            "decoder",
            {**_TEXT_IDS, "attention_mask": (DType.INT64, (BATCH, TOTAL_SEQUENCE)), **_POSITIONS},
            kv_form=GROWING,
        ),
        # The whole sequence at once, no cache (`convert --no-kv-cache`).
        GraphVariant("logits", {**_TEXT_IDS, **_MASK, **_POSITIONS}),
        # A fixed-size cache buffer (`optimize --kv-form fixed`): rows left-aligned, so positions are
        # cache slots and no attention_mask is needed.
        GraphVariant("decoder_fixed", {**_TEXT_IDS, **_POSITIONS}, kv_form=FIXED, exported=False),
        # ONNX Runtime's GroupQueryAttention decoder (`optimize --kv-form gqa`): it counts positions
        # by each row's valid length. ONNX Runtime only.
        GraphVariant(
            "decoder_gqa",
            {
                **_TEXT_IDS,
                **_POSITIONS,
                SEQLENS_K: (DType.INT32, (BATCH,)),
                TOTAL_SEQUENCE_LENGTH: (DType.INT32, ()),
            },
            kv_form=GQA,
            exported=False,
        ),
    )
    default_dims: ClassVar[Mapping[str, tuple[int, int, int]]] = {
        BATCH: (1, 1, 8),
        SEQUENCE: (1, 128, 1024),
        PAST_SEQUENCE: (1, 128, 1024),
        TOTAL_SEQUENCE: (1, 256, 1024),
        CACHE_SEQUENCE: (1, 1024, 1024),
    }
    forward_kwargs: ClassVar[Mapping[str, Any]] = {"use_cache": False}

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        if output == "logits":
            return [BATCH, SEQUENCE, int(config.vocab_size)]
        return [BATCH, SEQUENCE, int(config.hidden_size)]

    def heads(self, config: Any) -> Heads:
        kv = self.kv_layout(config)
        return Heads(int(config.num_attention_heads), kv.num_kv_heads, kv.head_dim)

    def check_tp(self, config: Any, tp: int) -> None:
        super().check_tp(config, tp)
        self.heads(config).check(tp)

    def tp_plan(self, config: Any, mapping: TPMapping) -> TPPlan:
        self.check_tp(config, mapping.tp)
        layers = tuple(
            (suffix, LayerSplit(split, self.tp_units.get(suffix, Units.EVEN)))
            for suffix, split in self.tp_splits.items()
        )
        return TPPlan(mapping, self.heads(config), layers)

    def check_config(self, config: Any) -> None:
        heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or 1)
        require(
            heads % kv_heads == 0,
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})",
        )

    def kv_layout(self, config: Any) -> KVLayout:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return KVLayout(
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            windows=sliding_windows(config),
        )


# The Llama family's tensor-parallel splits (Qwen3 and Gemma 3 name their layers the same): q/k/v by
# whole heads and gate/up by columns; o_proj and down by rows (one all-reduce each).
SEPARATE_QKV_SPLITS: Mapping[str, Split] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), Split.COLUMN),
    **dict.fromkeys(("o_proj", "down_proj"), Split.ROW),
    **dict.fromkeys(("embed_tokens", "lm_head"), Split.VOCAB),
}
SEPARATE_QKV_UNITS: Mapping[str, Units] = {
    "q_proj": Units.Q,
    "k_proj": Units.KV,
    "v_proj": Units.KV,
    "o_proj": Units.Q,
}


class TextEncoderSpec(ExportSpec):
    """Bidirectional text encoders: ids, mask and segment ids in; hidden states out."""

    variants: ClassVar[tuple[GraphVariant, ...]] = (
        GraphVariant("encoder", {**_TEXT_IDS, **_MASK, "token_type_ids": (DType.INT64, (BATCH, SEQUENCE))}),
    )

    def output_shape(self, config: Any, output: str) -> list[int | str]:
        if output == "pooler_output":
            return [BATCH, int(config.hidden_size)]
        if output == "logits":
            return [BATCH, SEQUENCE, int(config.vocab_size)]
        return [BATCH, SEQUENCE, int(config.hidden_size)]


class VisionEncoderSpec(ExportSpec):
    """Vision transformers: a fixed-size image in (only the batch is dynamic)."""

    variants: ClassVar[tuple[GraphVariant, ...]] = (
        # The image's channel and size dims are fixed per config (input_shape).
        GraphVariant("encoder", {"pixel_values": (None, (BATCH,))}),
    )
    default_dims: ClassVar[Mapping[str, tuple[int, int, int]]] = {BATCH: (1, 1, 8)}

    def input_shape(self, config: Any, name: str, declared: tuple[str, ...]) -> list[int | str]:
        size = int(config.image_size)
        return [*declared, int(config.num_channels), size, size]

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


def sliding_windows(config: Any) -> tuple[int, ...]:
    """Each layer's sliding window as transformers applies it (0: global), () when none slides.

    Configs with `layer_types` (Gemma 3, Qwen2/3) slide the "sliding_attention" layers; a bare
    `sliding_window` (Mistral) slides every layer. Qwen2/3 also need `use_sliding_window`.
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return ()
    types = getattr(config, "layer_types", None)
    layers = int(config.num_hidden_layers)
    if types is None:
        return (int(window),) * layers
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in types)
    return windows if any(windows) else ()


def require(condition: bool, message: str) -> None:
    """Config checks raise a user-facing error, not an assert."""
    if not condition:
        raise InputError(message)
