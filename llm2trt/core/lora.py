"""LoRA adapters: what a PEFT adapter directory holds, the records an artifact keeps of adapters, and
the runtime slots a graph takes them through.

An adapter directory is PEFT's: `adapter_config.json` (peft_type LORA, r, lora_alpha, use_rslora,
rank_pattern / alpha_pattern, fan_in_fan_out, modules_to_save) and `adapter_model.safetensors` (or
`adapter_model.bin`) with `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]
under the `base_model.model.` prefix. A layer's update is `scale * B @ A` with scale = alpha / r
(alpha / sqrt(r) with rslora), in nn.Linear's [out, in] orientation.

Runtime slots (`optimize --lora-slots N --lora-max-rank R`): per target module two graph inputs,
A stacked by slot [N, R, in] and B [N, out, R] (the scale folded into B, ranks under R zero-padded:
exact), and one `lora_slot` input [batch] naming each row's slot, -1 for none. This module reads
adapters and packs them into those inputs with numpy; merging into a torch model is convert's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm2trt.core.dtypes import to_numpy
from llm2trt.core.errors import InputError
from llm2trt.core.records import Record

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
SLOT_INPUT = "lora_slot"  # [batch] int64: each row's slot, -1 for the base model
NO_ADAPTER = -1


@dataclass(frozen=True)
class AdapterRecord(Record):
    """An adapter as an artifact records it: merged at convert, or known to a session."""

    name: str
    path: str
    sha256: str  # of the config and weight files, names included
    rank: int  # the largest rank of its layers
    alpha: float
    rslora: bool
    modules: list[str]  # the base model's modules it changes (LoRA layers), sorted
    saved: list[str] = field(default_factory=list)  # parameters it replaces whole (modules_to_save)


@dataclass(frozen=True)
class LoraLayer:
    """One target module's low-rank pair, in nn.Linear's orientation: update = scale * b @ a."""

    module: str
    a: np.ndarray  # [r, in] float32
    b: np.ndarray  # [out, r] float32
    scale: float
    embedding: bool = False  # an nn.Embedding's pair: a [r, vocab], b [dim, r]; update (b @ a).T

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        """The update [out, in] (an embedding's [vocab, dim]) in float32."""
        update: np.ndarray = (self.b.astype(np.float64) @ self.a.astype(np.float64) * self.scale).astype(np.float32)
        return update.T.copy() if self.embedding else update


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from its directory."""

    record: AdapterRecord
    layers: dict[str, LoraLayer]  # by module name (the base model's, no PEFT prefix)
    saved: dict[str, np.ndarray]  # parameter name -> tensor, for modules_to_save
    fan_in_fan_out: bool  # the base layers store [in, out] (GPT-2's Conv1D)

    @property
    def name(self) -> str:
        return self.record.name


def parse_adapter_arg(value: str) -> tuple[str | None, Path]:
    """`NAME=DIR` or `DIR` (named after its folder)."""
    name, sep, rest = value.partition("=")
    if sep and name and not Path(value).exists():
        return name, Path(rest)
    return None, Path(value)


def read_adapter(path: Path, name: str | None = None) -> LoraAdapter:
    """The adapter in `path`; one InputError line for whatever is missing, malformed or unsupported."""
    path = Path(path)
    name = name or path.name
    if not path.is_dir():
        raise InputError(f"adapter {name}: {path} is not a directory (a PEFT adapter folder is expected)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"adapter {name}: no {CONFIG_FILE} in {path}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
        raise InputError(f"adapter {name}: {config_path} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"adapter {name}: {config_path} is not a JSON object")
    _check_kind(name, config)
    weights_path = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights_path is None:
        raise InputError(f"adapter {name}: no {' or '.join(WEIGHT_FILES)} in {path}")
    tensors = _load_tensors(name, weights_path)
    layers, saved = _layers(name, config, tensors)
    if not layers and not saved:
        raise InputError(f"adapter {name}: {weights_path.name} holds no LoRA weights")
    digest = hashlib.sha256()
    for file in (config_path, weights_path):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    alpha = _alpha(name, config.get("lora_alpha", 8), "lora_alpha")
    record = AdapterRecord(
        name=name,
        path=str(path.resolve()),
        sha256=digest.hexdigest(),
        rank=max((layer.rank for layer in layers.values()), default=0),
        alpha=alpha,
        rslora=bool(config.get("use_rslora", False)),
        modules=sorted(layers),
        saved=sorted(saved),
    )
    return LoraAdapter(record, layers, saved, bool(config.get("fan_in_fan_out", False)))


def _check_kind(name: str, config: Mapping[str, object]) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise InputError(f"adapter {name}: PEFT type {kind!r} is not supported; llm2trt takes LoRA adapters")
    unsupported = {
        "use_dora": "DoRA (use_dora)",
        "use_qalora": "QALoRA (use_qalora)",
        "lora_bias": "LoRA biases (lora_bias)",
        "layer_replication": "layer replication",
        "trainable_token_indices": "trainable tokens",
        "target_parameters": "LoRA on parameters (target_parameters)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise InputError(f"adapter {name}: {what} is not supported; plain LoRA layers are")
    if config.get("bias", "none") != "none":
        raise InputError(f"adapter {name}: trained biases (bias={config['bias']!r}) are not supported; bias='none' is")


def _load_tensors(name: str, path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: one line naming it
        raise InputError(f"adapter {name}: cannot read {path.name}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"adapter {name}: {path.name} is not a tensor dictionary")
    return {k: to_numpy(v.detach()).astype(np.float32) for k, v in loaded.items() if isinstance(v, torch.Tensor)}


_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$"
)


def _layers(
    name: str, config: Mapping[str, object], tensors: Mapping[str, np.ndarray]
) -> tuple[dict[str, LoraLayer], dict[str, np.ndarray]]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        short = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        found = _LORA_KEY.match(short)
        if found is None:
            if ".lora_" in short or "magnitude" in short:
                raise InputError(f"adapter {name}: tensor {key!r} is not a LoRA A or B weight")
            saved[short] = value
            continue
        pairs.setdefault(found["module"], {})[found["kind"]] = value
    layers = {}
    for module, pair in sorted(pairs.items()):
        embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
        a = pair.get("lora_embedding_A" if embedding else "lora_A")
        b = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise InputError(f"adapter {name}: {module} has only one of its LoRA A and B weights")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(
                f"adapter {name}: {module}'s A {list(a.shape)} and B {list(b.shape)} do not make a low-rank pair"
            )
        rank = int(a.shape[0])
        if rank == 0:
            raise InputError(f"adapter {name}: {module}'s A {list(a.shape)} has rank 0")
        alpha = _pattern_value(name, config.get("alpha_pattern"), module, _alpha(name, config.get("lora_alpha", 8)))
        rslora = bool(config.get("use_rslora", False))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        layers[module] = LoraLayer(module, a, b, scale, embedding)
    return layers, saved


def _alpha(name: str, value: object, key: str = "lora_alpha") -> float:
    """A scaling numerator from the config: a finite number, else one line naming the key."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer past float's range
        number = math.inf
    if not math.isfinite(number):
        raise InputError(f"adapter {name}: {key} is {repr(value)[:40]}, expected a finite number")
    return number


def _pattern_value(name: str, patterns: object, module: str, default: float) -> float:
    """PEFT's per-module override: the first key that names the module's tail."""
    if isinstance(patterns, Mapping):
        for key, value in patterns.items():
            try:
                found = re.match(rf"(.*\.)?{key}$", module)
            except re.error as exc:
                raise InputError(
                    f"adapter {name}: alpha_pattern key {key!r} is not a regular expression ({exc})"
                ) from None
            if found:
                return _alpha(name, value, f"alpha_pattern[{key!r}]")
    return default


# -- runtime slots ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRequest(Record):
    """What `optimize --lora-slots` asks for: adapters held at once, their largest rank, and which
    layers (leaf names or regexes over module names; empty: every linear layer in the decoder layers)."""

    slots: int
    max_rank: int
    targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_rank < 1:
            raise InputError("--lora-slots and --lora-max-rank must be at least 1")


@dataclass(frozen=True)
class LoraShard(Record):
    """A tensor-parallel rank's part of a target: A's input columns (a row-parallel layer's rows) or
    B's output rows (a column-parallel layer's columns), as [start, stop) runs of the whole layer's."""

    weight: str  # "a" (in_features) or "b" (out_features)
    runs: list[list[int]]

    def take(self, layer: LoraLayer) -> tuple[np.ndarray, np.ndarray]:
        """The layer's (a, b) cut to this rank."""
        index = np.concatenate([np.arange(start, stop) for start, stop in self.runs])
        return (layer.a[:, index], layer.b) if self.weight == "a" else (layer.a, layer.b[index])

    @classmethod
    def of(cls, weight: str, index: np.ndarray) -> LoraShard:
        runs: list[list[int]] = []
        for i in index.tolist():
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        return cls(weight, runs)


@dataclass(frozen=True)
class LoraTarget(Record):
    """One linear layer with a runtime low-rank path: its module and its two adapter inputs."""

    module: str
    a: str  # input name: [slots, max_rank, in_features]
    b: str  # input name: [slots, out_features, max_rank]
    in_features: int  # this graph's (a rank's part, where split)
    out_features: int
    shard: LoraShard | None = None  # a tensor-parallel rank's cut of the adapters' weights


@dataclass(frozen=True)
class LoraSlots(Record):
    """A graph's runtime LoRA: how many adapters it holds at once, their largest rank, the layers."""

    slots: int
    max_rank: int
    targets: list[LoraTarget]
    slot_input: str = SLOT_INPUT

    def input_names(self) -> list[str]:
        return [self.slot_input, *(n for t in self.targets for n in (t.a, t.b))]

    def pack(self, adapters: Sequence[LoraAdapter]) -> dict[str, np.ndarray]:
        """The adapter inputs (float32) with `adapters` in slots 0, 1, ... (the rest zero);
        refused, one line each, when an adapter does not fit these slots."""
        if len(adapters) > self.slots:
            raise InputError(
                f"{len(adapters)} adapters do not fit this graph's {self.slots} LoRA slots (optimize --lora-slots)"
            )
        by_module = {t.module: t for t in self.targets}
        feeds: dict[str, np.ndarray] = {}
        for t in self.targets:
            feeds[t.a] = np.zeros((self.slots, self.max_rank, t.in_features), dtype=np.float32)
            feeds[t.b] = np.zeros((self.slots, t.out_features, self.max_rank), dtype=np.float32)
        for slot, adapter in enumerate(adapters):
            self._check(adapter, by_module)
            for module, layer in adapter.layers.items():
                t = by_module[module]
                a, b = t.shard.take(layer) if t.shard is not None else (layer.a, layer.b)
                feeds[t.a][slot, : layer.rank] = a
                feeds[t.b][slot, :, : layer.rank] = b * layer.scale
        return feeds

    def _check(self, adapter: LoraAdapter, by_module: Mapping[str, LoraTarget]) -> None:
        name = adapter.name
        if adapter.saved:
            raise InputError(
                f"adapter {name}: it replaces {', '.join(sorted(adapter.saved))} whole (modules_to_save), "
                "which runtime slots cannot; merge it at convert (--lora)"
            )
        for module, layer in adapter.layers.items():
            if layer.embedding:
                raise InputError(f"adapter {name}: {module} is an embedding; runtime slots hold linear layers only")
            target = by_module.get(module)
            if target is None:
                raise InputError(
                    f"adapter {name}: {module} has no LoRA slot in this graph "
                    f"(optimize --lora-targets; slotted: {_short(sorted(by_module))})"
                )
            if layer.rank > self.max_rank:
                raise InputError(
                    f"adapter {name}: rank {layer.rank} at {module} is over the slots' maximum {self.max_rank} "
                    "(optimize --lora-max-rank)"
                )
            shard = target.shard
            a, b = shard.take(layer) if shard is not None and _fits(layer, shard) else (layer.a, layer.b)
            want = (layer.rank, target.in_features), (target.out_features, layer.rank)
            if (a.shape, b.shape) != want:
                raise InputError(
                    f"adapter {name}: {module} has A {list(layer.a.shape)} and B {list(layer.b.shape)}; the base "
                    f"layer is {target.in_features} -> {target.out_features}, so A [{layer.rank}, "
                    f"{target.in_features}] and B [{target.out_features}, {layer.rank}]"
                )


def _fits(layer: LoraLayer, shard: LoraShard) -> bool:
    """The layer is as wide as the whole layer a shard cuts (else the shape check names it)."""
    whole = max(stop for _start, stop in shard.runs)
    width = layer.a.shape[1] if shard.weight == "a" else layer.b.shape[0]
    return bool(width >= whole)


def _short(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


@dataclass(frozen=True)
class AdapterBatch:
    """The adapters a batch runs with: in slot order, and each row's slot (NO_ADAPTER: none)."""

    adapters: tuple[LoraAdapter, ...]
    rows: tuple[int, ...]

    @classmethod
    def per_row(cls, choices: Sequence[LoraAdapter | None]) -> AdapterBatch:
        """One adapter (or None) per row; rows naming the same adapter share its slot."""
        adapters: list[LoraAdapter] = []
        rows = []
        for adapter in choices:
            if adapter is None:
                rows.append(NO_ADAPTER)
                continue
            slot = next((i for i, a in enumerate(adapters) if a.record.sha256 == adapter.record.sha256), None)
            if slot is None:
                slot = len(adapters)
                adapters.append(adapter)
            rows.append(slot)
        return cls(tuple(adapters), tuple(rows))
