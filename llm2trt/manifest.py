"""The artifact manifest: what every stage writes and every later stage reads instead of guessing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llm2trt import __version__
from llm2trt.errors import InputError
from llm2trt.kv import KVLayout

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
REPORT_NAME = "report.json"
ENGINE_NAME = "model.engine"
BUILD_NAME = "build.json"

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; symbolic dims are strings shared across tensors."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, bfloat16, int64, bool
    shape: list[Dim]

    def symbolic_dims(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]


@dataclass(frozen=True)
class DimRange:
    """Range of one symbolic dim: what TensorRT optimization profiles are made from."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"invalid dim range {self.min}:{self.opt}:{self.max} (need 1 <= min <= opt <= max)")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class SourceInfo:
    """Where the model came from, with a content hash so later stages can tell it changed."""

    kind: str  # tiny | hf | gguf
    location: str  # the tiny spec name, or an absolute path
    sha256: str


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: counts per rule (or per thing removed/folded), and whether it changed the graph."""

    name: str
    modified: bool
    counts: dict[str, int]
    seconds: float
    stage: str = "optimize"


@dataclass
class Manifest:
    architecture: str  # the exporter spec's name: gpt2, llama, bert, vit
    model_type: str  # the config's model_type: llama, mistral, qwen2, ...
    model_class: str  # the transformers class exported, e.g. LlamaForCausalLM
    task: str
    dtype: str  # fp32 | fp16 | bf16
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    main_output: str
    dynamic_dims: dict[str, DimRange]
    source: SourceInfo
    kv_cache: KVLayout | None = None
    attn_implementation: str = "sdpa"
    exporter: str = "torchscript"
    passes: list[PassRecord] = field(default_factory=list)
    expected_fusions: dict[str, int] = field(default_factory=dict)
    fusions: dict[str, int] = field(default_factory=dict)
    quantization: str | None = None
    tp_size: int = 1
    rank: int = 0
    files: dict[str, Any] = field(default_factory=lambda: {"model": MODEL_NAME, "external_data": [DATA_NAME]})
    op_counts: dict[str, int] = field(default_factory=dict)
    # The transformers config as a dict: later stages make sample inputs from it without the weights.
    model_config: dict[str, Any] = field(default_factory=dict)
    llm2trt_version: str = __version__

    def symbolic_dims(self) -> set[str]:
        """The dynamic dims of the graph inputs (what optimization profiles range over)."""
        return {d for t in self.inputs for d in t.symbolic_dims()}

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def spec_and_config(self) -> tuple[Any, Any]:
        """The exporter spec and a transformers config rebuilt from the manifest (no weights)."""
        from transformers import AutoConfig

        from llm2trt.exporters import get_spec

        fields = {k: v for k, v in self.model_config.items() if k != "model_type"}
        config = AutoConfig.for_model(self.model_type, **fields)
        return get_spec(self.architecture), config

    def with_passes(self, records: list[PassRecord]) -> Manifest:
        return replace(self, passes=[*self.passes, *records], llm2trt_version=__version__)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kv_cache"] = self.kv_cache.to_dict() if self.kv_cache else None
        data["dynamic_dims"] = {k: asdict(v) for k, v in self.dynamic_dims.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            kv = data.get("kv_cache")
            return cls(
                architecture=data["architecture"],
                model_type=data["model_type"],
                model_class=data["model_class"],
                task=data["task"],
                dtype=data["dtype"],
                opset=int(data["opset"]),
                inputs=[TensorSpec(**t) for t in data["inputs"]],
                outputs=[TensorSpec(**t) for t in data["outputs"]],
                main_output=data["main_output"],
                dynamic_dims={k: DimRange(**v) for k, v in data["dynamic_dims"].items()},
                source=SourceInfo(**data["source"]),
                kv_cache=KVLayout.from_dict(kv) if kv else None,
                attn_implementation=data.get("attn_implementation", "sdpa"),
                exporter=data.get("exporter", "torchscript"),
                passes=[PassRecord(**p) for p in data.get("passes", [])],
                expected_fusions=dict(data.get("expected_fusions", {})),
                fusions=dict(data.get("fusions", {})),
                quantization=data.get("quantization"),
                tp_size=int(data.get("tp_size", 1)),
                rank=int(data.get("rank", 0)),
                files=dict(data.get("files", {})),
                op_counts=dict(data.get("op_counts", {})),
                model_config=dict(data.get("model_config", {})),
                llm2trt_version=data.get("llm2trt_version", "unknown"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"manifest is malformed ({type(exc).__name__}: {exc})") from None

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        if not directory.exists():
            raise InputError(f"artifact directory does not exist: {directory}")
        if not directory.is_dir():
            raise InputError(f"not an llm2trt artifact directory: {directory} is a file")
        if not path.is_file():
            raise InputError(f"not an llm2trt artifact: {path} is missing (make one with `llm2trt convert`)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"cannot read {path}: not a JSON object")
        return cls.from_dict(data)
