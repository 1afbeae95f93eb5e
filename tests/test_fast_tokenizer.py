"""The artifact's tokenizer without transformers (llm2trt/convert/fast_tokenizer.py) gives
transformers' ids, text and chat ids on the real tokenizers, and a cold `generate` no longer imports
transformers or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llm2trt.convert.fast_tokenizer import FastTokenizer, fast_tokenizer
from llm2trt.convert.tokenizer import conversation_ids, load_tokenizer
from llm2trt.core.manifest import Manifest

TEXTS = (
    "The capital of France is",
    "héllo wörld — ✓ 日本語 \n\n  two  spaces\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    "1234567890 3.14159 e=mc^2 def f(x): return x",
)
CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain? ünïcödé"},
    ],
)


def same_as_transformers(artifact: Path) -> FastTokenizer:
    """The fast tokenizer of `artifact`, checked against transformers' on TEXTS and CONVERSATIONS."""
    manifest = Manifest.read(artifact)
    fast, slow = load_tokenizer(artifact, manifest), load_tokenizer(artifact, manifest, fast=False)
    assert isinstance(fast, FastTokenizer), "the artifact's tokenizer should not need transformers"
    for text in TEXTS:
        for special in (True, False):
            assert fast(text, add_special_tokens=special).input_ids == slow(text, add_special_tokens=special).input_ids
        ids = [*slow(text).input_ids, 5, 17, 2, 1]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(ids, skip_special_tokens=skip)
    assert bool(fast.chat_template) == bool(getattr(slow, "chat_template", None))
    if fast.chat_template:
        for messages in CONVERSATIONS:
            assert conversation_ids(fast, messages) == conversation_ids(slow, messages)
    return fast


def test_smollm2_tokenizer_is_transformers_without_transformers(smollm2_artifact: Path) -> None:
    assert same_as_transformers(smollm2_artifact).chat_template


def test_a_config_tokenizer_json_may_not_carry_goes_to_transformers(smollm2_artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tokenizer"
    shutil.copytree(smollm2_artifact / "tokenizer", copy)
    config: dict[str, Any] = json.loads((copy / "tokenizer_config.json").read_text())
    assert fast_tokenizer(copy) is not None
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert fast_tokenizer(copy) is None
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "chat_template.jinja").write_text("{% generation %}{{ messages }}{% endgeneration %}")
    assert fast_tokenizer(copy) is None  # transformers' own template extension


def test_cold_generate_imports_neither_transformers_nor_torch(smollm2_artifact: Path) -> None:
    code = (
        "import json, sys; from pathlib import Path; from llm2trt.generate.driver import generate; "
        f"r = generate(Path({str(smollm2_artifact)!r}), prompts=['The capital of France is']); "
        "print(json.dumps([r.rows[0].text, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    text, loaded = json.loads(out.stdout.splitlines()[-1])
    assert "Paris" in text
    assert loaded == []


@pytest.mark.parametrize("bad", ["{", "[]", '{"chat_template": 3}'])
def test_an_unreadable_config_goes_to_transformers(tmp_path: Path, bad: str) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(bad)
    assert fast_tokenizer(tmp_path) is None
