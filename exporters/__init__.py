"""The exporter registry: one spec per architecture, looked up by name or by config model_type."""

from __future__ import annotations

from llm2trt.core.errors import InputError
from llm2trt.core.registry import Registry
from llm2trt.exporters.base import ExportSpec, GraphVariant
from llm2trt.exporters.bert import BertSpec
from llm2trt.exporters.bloom import BloomSpec
from llm2trt.exporters.gemma3 import Gemma3Spec
from llm2trt.exporters.gpt2 import GPT2Spec
from llm2trt.exporters.llama import LlamaSpec
from llm2trt.exporters.mixtral import MixtralSpec
from llm2trt.exporters.phi3 import Phi3Spec
from llm2trt.exporters.qwen2_moe import Qwen2MoESpec
from llm2trt.exporters.qwen3 import Qwen3Spec
from llm2trt.exporters.qwen3_moe import Qwen3MoESpec
from llm2trt.exporters.vit import ViTSpec

EXPORTERS: Registry[ExportSpec] = Registry("exporter")


def register(spec: ExportSpec) -> ExportSpec:
    taken = {t: s.name for s in EXPORTERS.entries() for t in s.model_types}
    for model_type in spec.model_types:
        if model_type in taken:
            raise ValueError(f"model_type {model_type!r} already belongs to exporter {taken[model_type]!r}")
    return EXPORTERS.register(spec.name, spec)


for _spec in (
    GPT2Spec(),
    LlamaSpec(),
    Qwen3Spec(),
    Gemma3Spec(),
    Phi3Spec(),
    BloomSpec(),
    MixtralSpec(),
    Qwen3MoESpec(),
    Qwen2MoESpec(),
    BertSpec(),
    ViTSpec(),
):
    register(_spec)


def all_specs() -> list[ExportSpec]:
    return EXPORTERS.entries()


def supported_summary() -> str:
    parts = []
    for spec in EXPORTERS.entries():
        extra = [t for t in spec.model_types if t != spec.name]
        parts.append(f"{spec.name} ({', '.join([spec.name, *extra])})" if extra else spec.name)
    return ", ".join(parts)


def get_spec(name: str) -> ExportSpec:
    if name not in EXPORTERS:
        raise InputError(f"unknown exporter {name!r}; supported: {supported_summary()}")
    return EXPORTERS.get(name)


def spec_for_model_type(model_type: str) -> ExportSpec:
    for spec in EXPORTERS.entries():
        if model_type in spec.model_types:
            return spec
    raise InputError(f"unsupported architecture {model_type!r} (config model_type); supported: {supported_summary()}")


__all__ = [
    "EXPORTERS",
    "ExportSpec",
    "GraphVariant",
    "all_specs",
    "get_spec",
    "register",
    "spec_for_model_type",
    "supported_summary",
]
