"""The artifact's tokenizer: saved inside it at convert (generation then needs neither the source nor a
slow GGUF tokenizer load), loaded by every stage that turns text into ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm2trt.core.errors import InputError
from llm2trt.core.manifest import GenerationDefaults, Manifest

if TYPE_CHECKING:
    from llm2trt.convert.sources import ModelSource

TOKENIZER_DIR = "tokenizer"


def save_tokenizer(source: ModelSource, stage: Path) -> GenerationDefaults:
    """Keep the tokenizer (and chat template) inside the artifact being written in `stage`."""
    tokenizer = source.tokenizer()
    defaults = source.generation_defaults(tokenizer)
    if tokenizer is None:
        return defaults
    tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
    return replace(defaults, tokenizer=TOKENIZER_DIR)


def load_tokenizer(artifact: Path, manifest: Manifest, *, fast: bool = True) -> Any:
    """The artifact's tokenizer (None: it has none): without transformers where its tokenizer.json
    says everything (fast_tokenizer.py), else transformers' (`fast=False`: always transformers')."""
    generation = manifest.generation
    if generation is None or generation.tokenizer is None:
        return None
    if fast:
        from llm2trt.convert.fast_tokenizer import fast_tokenizer

        found = fast_tokenizer(artifact / generation.tokenizer)
        if found is not None:
            return found
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(artifact / generation.tokenizer), local_files_only=True, trust_remote_code=False
    )


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """One user turn through the chat template, with the assistant's turn opened."""
    return conversation_ids(tokenizer, [{"role": "user", "content": prompt}])


def conversation_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Messages through the chat template, with the assistant's turn opened. transformers 5 returns
    a BatchEncoding where 4.x returned the ids: both are taken."""
    from llm2trt.convert.fast_tokenizer import FastTokenizer

    if isinstance(tokenizer, FastTokenizer):
        return tokenizer.apply_chat_template(messages)
    out = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        out = out[0]
    return [int(i) for i in out]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if tokenizer is None:
        raise InputError("this artifact has no tokenizer (tiny models have none): give token ids with --ids")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: this model's tokenizer has no chat template")
        return [chat_ids(tokenizer, p) for p in prompts]
    # The tokenizer's own special tokens, as transformers' pipelines add them: Gemma wants its <bos>
    # (without it the 270M model repeats itself), GPT-2 and SmolLM2 add none.
    return [list(tokenizer(p).input_ids) for p in prompts]


def windows_of(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of a token stream (the last may be shorter)."""
    return [ids[i : i + window] for i in range(0, len(ids), window)]
