"""The artifact's tokenizer without transformers: its `tokenizer.json` through the `tokenizers`
library and its chat template through Jinja, as transformers renders templates.

Importing transformers (and the torch it pulls in) was most of a cold `generate`'s start-up: on this
project's 2-core machine 2.0 s of a 4.6 s SmolLM2 generate, on an H100 most of 11 s. What a
run needs of a tokenizer is small: text to ids, ids to text, messages to ids. transformers 5 keeps
a fast tokenizer's behaviour in its `tokenizer.json`, so the `tokenizers` library gives the same
ids; `tests/test_fast_tokenizer.py` holds that against transformers on the real tokenizers. A
tokenizer whose config asks for something `tokenizer.json` may not carry (added BOS/EOS flags,
space clean-up, lower-casing), or whose template needs more than plain Jinja, goes to transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# Config keys that change encoding or decoding beyond tokenizer.json when true.
_NEEDS_TRANSFORMERS = (
    "add_bos_token",
    "add_eos_token",
    "clean_up_tokenization_spaces",
    "do_lower_case",
    "legacy",
    "add_prefix_space",
    "split_special_tokens",
)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Encoded(dict[str, list[int]]):
    """What `tokenizer(text)` returns: the ids as `.input_ids` and as `["input_ids"]`."""

    @property
    def input_ids(self) -> list[int]:
        return self["input_ids"]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out
        value = value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """Encode, decode and chat-template like the transformers tokenizer saved in `directory`."""

    def __init__(self, directory: Path, config: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.directory = directory
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special_tokens = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
        # Compiled now: a template plain Jinja cannot compile is found at load, not at a request.
        self._compiled: Any = _environment().from_string(self.chat_template) if self.chat_template else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoded:
        return Encoded(input_ids=self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages`, as transformers renders it (a sandboxed environment,
        blocks trimmed, loop controls, `raise_exception`, `strftime_now`, JSON without ASCII escapes,
        the special tokens by name)."""
        if self._compiled is None:
            raise ValueError("this tokenizer has no chat template")
        rendered: str = self._compiled.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return rendered

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        return self(text, add_special_tokens=False).input_ids


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def fast_tokenizer(directory: Path) -> FastTokenizer | None:
    """The tokenizer in `directory` without transformers, or None where only transformers gives
    its behaviour (no tokenizer.json, a config flag tokenizer.json may not carry, a template plain
    Jinja cannot compile)."""
    config_file = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        return None
    if not isinstance(config, dict) or any(config.get(key) for key in _NEEDS_TRANSFORMERS):
        return None
    try:
        return FastTokenizer(directory, config)
    except Exception:  # a tokenizer.json or template this path cannot read: transformers decides
        return None
