"""Fuzz the server's request parsing (llm2trt/serve/protocol.py): any body bytes, any JSON, and
near-valid /v1/completions and /v1/chat/completions bodies with fields replaced by values of every
JSON type. The contract: typed parameters, or an ApiError with a 4xx status and a one-line message;
never another exception (which the server would answer with a 500)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llm2trt.serve.protocol import ApiError, messages_of, params, parse_json, prompt_of
from tests.fuzz.common import OUTCOMES, example, fuzz_settings, no_hang

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stream", "stream_options", "n", "best_of", "echo", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "suffix", "tools", "response_format", "model",
]  # fmt: skip
VALID = {
    "prompt": [1, 2, 3],
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 8,
    "temperature": 0.5,
    "stop": ["\n"],
    "stream": True,
}


def parse(body: bytes, chat: bool) -> Any:
    """What the server does with a body before the model sees it."""
    document = parse_json(body)
    p = params(document, chat=chat, random_seed=7)
    return (messages_of(document) if chat else prompt_of(document)), p


def held(body: bytes, chat: bool) -> None:
    example()
    try:
        with no_hang():
            parse(body, chat)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert exc.message.strip() and len(exc.message.strip().splitlines()) == 1, exc.message
        json.dumps(exc.body())  # the error object is JSON
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["parsed"] += 1


GIVEN = {
    "edits": st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
    "raw": st.one_of(st.none(), st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode())),
    "chat": st.booleans(),
}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_openai_request(edits: dict[str, Any], raw: bytes | None, chat: bool) -> None:
    body = raw if raw is not None else json.dumps({**VALID, **edits}).encode()
    held(body, chat)


def test_the_valid_body_parses() -> None:
    prompt, p = parse(json.dumps(VALID).encode(), chat=False)
    assert prompt == [1, 2, 3] and p.sampling.max_new_tokens == 8 and p.stream


def test_regressions_are_4xx() -> None:
    for body in (b"[" * 5000 + b"]" * 5000, b'{"prompt": [1], "temperature": 1e999}', b'{"seed": 1e5}'):
        held(body, chat=False)
