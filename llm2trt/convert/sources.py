"""Model sources: a local Hugging Face directory, a model id in the local Hugging Face cache, a
.gguf file, or a built-in `tiny:<arch>` spec.

Resolving a source reads only its config (fast, and enough to refuse an unsupported model before
any slow work); the weights load when `load()` is called. Nothing here touches the network, and
nothing here runs a checkpoint's own code: `trust_remote_code` is always False (a config's
`auto_map` is ignored; the transformers class of its `model_type` is exported) and .bin weights are
unpickled with `weights_only=True` (a pickle that would call anything is refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from llm2trt.core.artifact import sha256_files
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError, first_line
from llm2trt.core.log import step
from llm2trt.core.manifest import GenerationDefaults, Manifest, SourceInfo
from llm2trt.exporters import ExportSpec, all_specs, get_spec, spec_for_model_type

if TYPE_CHECKING:
    import torch

    from llm2trt.convert.prequant import Prequant

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_SEED = 0
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_ST_INDEX, _BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", _BIN_INDEX)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")

# transformers must never reach for a hub: every load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_names() -> list[str]:
    return [TINY_PREFIX + spec.name for spec in all_specs()]


@dataclass
class ModelSource:
    """A resolved model: its kind, where it lives, its config and the spec that exports it."""

    kind: str  # tiny | hf | gguf
    location: str  # tiny spec name, or absolute path
    config: Any
    spec: ExportSpec
    prequant: Prequant | None = None  # a GPTQ/AWQ/compressed-tensors checkpoint, imported as is

    @property
    def display(self) -> str:
        return TINY_PREFIX + self.location if self.kind == "tiny" else self.location

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [Path(self.location)]
        root = Path(self.location)
        files = {root / "config.json"}
        for pattern in _WEIGHT_PATTERNS:
            # A dangling link (a cache snapshot of the format transformers does not load, whose
            # blobs were never fetched) holds no weights: nothing to hash.
            files.update(f for f in root.glob(pattern) if f.exists())
        return sorted(files)

    def info(self) -> SourceInfo:
        if self.kind == "tiny":
            blob = json.dumps(
                {"spec": self.location, "seed": TINY_SEED, "config": self.spec.tiny_config}, sort_keys=True
            )
            digest = hashlib.sha256(blob.encode()).hexdigest()
        else:
            with step(f"hashing {self.location}"):
                root = Path(self.location) if self.kind == "hf" else None
                digest = sha256_files(self.weight_files(), root)
        return SourceInfo(kind=self.kind, location=self.location, sha256=digest)

    def load(self, dtype: DType = DType.FP32, attn_implementation: str = "sdpa") -> torch.nn.Module:
        """The transformers model in eval mode, in `dtype`."""
        import torch
        import transformers

        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InputError(
                f"unknown attention implementation {attn_implementation!r}; "
                f"choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        attn_implementation = self.spec.attention(attn_implementation)
        cls_name = self.spec.model_class(self.config)
        cls = getattr(transformers, cls_name)
        tdtype = dtype.torch
        from safetensors import SafetensorError

        with step(f"loading {self.display} ({cls_name}, {dtype.value})"), _no_progress_bar():
            try:
                if self.kind == "tiny":
                    torch.manual_seed(TINY_SEED)
                    model = cls._from_config(self.config, attn_implementation=attn_implementation)
                    model = model.to(tdtype)
                elif self.kind == "gguf":
                    path = Path(self.location)
                    model = cls.from_pretrained(
                        str(path.parent),
                        gguf_file=path.name,
                        # The config read at resolve time: without it transformers parses the file's
                        # metadata again, every token of its vocabulary (Gemma 3's 262k: ~20 s).
                        config=self.config,
                        dtype=tdtype,
                        attn_implementation=attn_implementation,
                        local_files_only=True,
                    )
                elif self.prequant is not None:  # its dequantized weights: the export traces a float model
                    model = self.prequant.load_float(cls, self.config, tdtype, attn_implementation)
                else:
                    model = self.spec.from_pretrained(
                        cls,
                        self.location,
                        self.config,
                        dtype=_stored_dtype(self.config, dtype).torch,
                        attn_implementation=attn_implementation,
                        local_files_only=True,
                        weights_only=True,  # .bin: torch.load(weights_only=True), tensors and nothing else
                        trust_remote_code=False,  # nor custom_generate/generate.py
                    )
            except pickle.UnpicklingError as exc:
                raise InputError(_unpickling_refusal(Path(self.location), exc)) from None
            except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
                raise InputError(f"cannot load weights of {self.display}: {first_line(exc)}") from None
        if model.dtype != tdtype:
            _upcast(model, tdtype)
        model.eval()
        return model  # type: ignore[no-any-return]

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (HF directory with tokenizer files, or the GGUF's), else None."""
        from transformers import AutoTokenizer

        if self.kind == "tiny":
            return None
        if self.kind == "hf" and not any((Path(self.location) / f).is_file() for f in _TOKENIZER_FILES):
            return None
        path = Path(self.location)
        kwargs = {"gguf_file": path.name} if self.kind == "gguf" else {}
        where = str(path.parent) if self.kind == "gguf" else self.location
        with step(f"loading the tokenizer of {self.display}"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    where, local_files_only=True, trust_remote_code=False, **kwargs
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("no tokenizer for %s: %s", self.display, first_line(exc))
                return None
        # A tokenizer_config.json auto_map points at Python that was not run and is not copied: saved
        # as is, the artifact's tokenizer would name code it does not hold.
        tokenizer.init_kwargs.pop("auto_map", None)
        if getattr(tokenizer, "_auto_map", None) is not None:
            tokenizer._auto_map = None
        return tokenizer

    def generation_defaults(self, tokenizer: Any | None) -> GenerationDefaults:
        """EOS, pad and BOS ids: the generation config's, else the model config's, else the tokenizer's."""
        sources = [self.config]
        if self.kind == "hf" and (Path(self.location) / "generation_config.json").is_file():
            from transformers import GenerationConfig

            sources.insert(0, GenerationConfig.from_pretrained(self.location, local_files_only=True))
        eos: list[int] = []
        for source in sources:
            value = getattr(source, "eos_token_id", None)
            eos = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
            if eos:
                break
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [int(tokenizer.eos_token_id)]
        pad = next(
            (getattr(s, "pad_token_id", None) for s in sources if getattr(s, "pad_token_id", None) is not None), None
        )
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        bos = getattr(self.config, "bos_token_id", None)
        return GenerationDefaults(
            eos_token_ids=eos,
            pad_token_id=int(pad) if pad is not None else (eos[0] if eos else None),
            bos_token_id=int(bos) if bos is not None else None,
            chat_template=bool(getattr(tokenizer, "chat_template", None)),
        )

    def check_unchanged(self, recorded: SourceInfo) -> None:
        """Refuse to compare against a source that changed since it was converted."""
        now = self.info()
        if now.sha256 != recorded.sha256:
            raise InputError(
                f"model source {self.display} changed since it was converted "
                f"(sha256 {recorded.sha256[:12]} -> {now.sha256[:12]})"
            )


def _stored_dtype(config: Any, wanted: DType) -> DType:
    """The checkpoint's float dtype when `wanted` is wider (load as stored, then `_upcast`), else `wanted`."""
    stored = DType.find(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    floats = (DType.FP16, DType.BF16, DType.FP32)
    if stored in floats and wanted in floats and stored.numpy.itemsize < wanted.numpy.itemsize:
        return stored
    return wanted


def _upcast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Widen the weights one at a time, dropping each source tensor's pages of the memory-mapped
    checkpoint as it goes: transformers' own conversion keeps the whole narrow checkpoint resident
    beside the wide copy (fp16 -> fp32 of 1.1B peaked at 1.6x the fp32 bytes; this at 1.1x)."""
    import torch

    from llm2trt.core.memory import drop_mapped_pages

    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not tensor.is_floating_point() or tensor.dtype == dtype:
                continue  # a tied weight is converted once, through its first module
            source = tensor.data
            wide = source.to(dtype)
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = wide
            else:
                module._buffers[name] = wide
            drop_mapped_pages([(source.data_ptr(), source.nbytes)])
            del source
    cast(Any, model).config.dtype = dtype


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise InputError(f"cannot read {path}: not a JSON object")
    return data


def _unpickling_refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """One line for a .bin that torch's weights-only unpickler refused: which file (when there is
    one) and what it would have called. torch's own message advises weights_only=False; never that."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    detail = next((line for line in lines if not line.startswith("Check the documentation")), first_line(exc))
    bins = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    where = str(path / bins[0]) if len(bins) == 1 else f"one of the {len(bins)} pytorch_model*.bin files in {path}"
    return (
        f"refusing to unpickle {where}: it holds more than "
        f"tensors ({detail[:200].rstrip('.')}); llm2trt loads .bin weights with torch.load(weights_only=True) and "
        "never runs code from a checkpoint: get its safetensors from a source you trust"
    )


def _check_complete(path: Path) -> None:
    """Refuse an incomplete checkpoint before any slow work: a dangling link (a cache snapshot whose
    blob is missing, an interrupted download) or a shard its index names that is not there. Only the
    format transformers will load is checked (safetensors when there are any): a snapshot fetched
    with `--include "*.safetensors" "*.json"` has pytorch_model.bin.index.json and no .bin files."""
    safetensors = any(path.glob("*.safetensors")) or (path / _ST_INDEX).exists()
    pattern, index_name = ("*.safetensors", _ST_INDEX) if safetensors else ("pytorch_model*.bin", _BIN_INDEX)
    for file in sorted(path.glob(pattern)):
        if not file.exists():
            raise InputError(
                f"incomplete weights in {path}: {file.name} is a link to a missing file ({os.readlink(file)})"
            )
    index = path / index_name
    if not index.exists() and not index.is_symlink():
        return
    if not index.exists():
        raise InputError(
            f"incomplete weights in {path}: {index_name} is a link to a missing file ({os.readlink(index)})"
        )
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"cannot read {index}: it has no weight_map")
    shards = sorted({str(name) for name in weight_map.values()})
    outside = [name for name in shards if Path(name).name != name]
    if outside:
        raise InputError(f"{index} names a shard outside {path}: {outside[0]!r}")
    missing = [name for name in shards if not (path / name).exists()]
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise InputError(
            f"incomplete weights in {path}: {len(missing)} of the {len(shards)} shards {index_name} names "
            f"{'is' if len(missing) == 1 else 'are'} missing ({listed})"
        )


def _resolve_tiny(name: str) -> ModelSource:
    arch = name[len(TINY_PREFIX) :]
    try:
        spec = get_spec(arch)
    except InputError:
        raise InputError(f"unknown tiny model {name!r}; available: {', '.join(tiny_names())}") from None
    return ModelSource("tiny", spec.name, spec.make_tiny_config(), spec)


def _resolve_hf_dir(path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path} is not a Hugging Face model directory: config.json is missing")
    raw = _read_json(config_path)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"{config_path} has no model_type; cannot tell the architecture")
    spec = spec_for_model_type(model_type)
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise InputError(f"no weights in {path} (expected *.safetensors or pytorch_model.bin)")
    _check_complete(path)
    prequant = None
    # A pre-quantized checkpoint (its config, or AutoGPTQ's/AutoAWQ's quant*_config.json): refused
    # here, before any slow work, if unsupported.
    if raw.get("quantization_config") is not None or any(path.glob("quant*_config.json")):
        from llm2trt.convert.prequant import Prequant, find_config, read_scheme

        quantized = find_config(path, raw)
        prequant = Prequant(path, read_scheme(*quantized)) if quantized is not None else None
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:  # the last: a field's type
        raise InputError(f"cannot read {config_path}: {first_line(exc)}") from None
    if prequant is not None and hasattr(config, "quantization_config"):
        del config.quantization_config  # the float model is loaded from the dequantized weights
    config = spec.export_config(config)
    spec.check_config(config)
    if raw.get("auto_map"):
        logger.warning(
            "ignoring custom code in %s (auto_map: %s): llm2trt never runs a model's own Python; it exports "
            "transformers' %s for model_type %r",
            config_path,
            ", ".join(sorted(map(str, raw["auto_map"]))) if isinstance(raw["auto_map"], dict) else raw["auto_map"],
            spec.model_class(config),
            model_type,
        )
    return ModelSource("hf", str(path), config, spec, prequant)


def _resolve_gguf(path: Path) -> ModelSource:
    from transformers import AutoConfig

    with step(f"reading GGUF metadata of {path.name}"):
        try:
            config = AutoConfig.from_pretrained(
                str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError, OverflowError, struct.error) as exc:
            # struct.error, OverflowError: a file cut short, or a count past any file's size, in its metadata
            raise InputError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
        except ImportError as exc:
            raise InputError(f"reading .gguf needs the gguf package (pip install 'llm2trt[gguf]'): {exc}") from None
    spec = spec_for_model_type(config.model_type)
    # GGUF weights come out dequantized; the export is a plain float model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    spec.check_config(config)
    return ModelSource("gguf", str(path), config, spec)


# A Hugging Face model id: `name` or `org/name` (letters, digits, - _ .).
_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _resolve_model_id(model_id: str) -> Path:
    """The snapshot directory of a model id in the local cache (its refs/main revision)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(model_id, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise InputError(
            f"model {model_id!r} is neither a path nor in the local Hugging Face cache ({cache}); llm2trt never "
            f"downloads: fetch it where there is a network (`huggingface-cli download {model_id}`), "
            "or pass a directory, a .gguf file or a tiny:<arch> spec"
        ) from None


def resolve_model(model: str) -> ModelSource:
    """Turn a MODEL argument into a source, reading only its config."""
    if model.startswith(TINY_PREFIX):
        return _resolve_tiny(model)
    path = Path(model).expanduser()
    if not path.exists() and _MODEL_ID.match(model):
        path = _resolve_model_id(model)
    if not path.exists():
        raise InputError(
            f"model path does not exist: {model} (expected a directory, a .gguf file, a model id in the local "
            f"Hugging Face cache, or one of {', '.join(tiny_names())})"
        )
    path = path.resolve()
    if path.is_dir():
        return _resolve_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        return _resolve_gguf(path)
    raise InputError(f"unsupported model file {path}: expected a Hugging Face directory or a .gguf file")


def source_from_info(info: SourceInfo) -> ModelSource:
    """Re-open the source an artifact was converted from (for the PyTorch reference)."""
    if info.kind == "tiny":
        return _resolve_tiny(TINY_PREFIX + info.location)
    if not Path(info.location).exists():
        raise InputError(f"the model this artifact came from is gone: {info.location}")
    return resolve_model(info.location)


def spec_and_config(manifest: Manifest) -> tuple[ExportSpec, Any]:
    """The exporter spec and a transformers config rebuilt from the manifest (no weights)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in manifest.model_config.items() if k != "model_type"}
    config = AutoConfig.for_model(manifest.model_type, **fields)
    return get_spec(manifest.architecture), config


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers draws a bar while it loads weights: noise between llm2trt's own step lines, and in
    a log file a run of carriage returns. Off while llm2trt loads a model, unless -v."""
    from transformers.utils import logging as hf_logging

    if logger.isEnabledFor(logging.DEBUG) or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
