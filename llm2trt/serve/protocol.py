"""The OpenAI API's request bodies, checked field by field into typed parameters, and its error
objects. Every refusal names the field (`param`) and why, with the status the API uses: 400 for a
bad value, 401 without the key, 404 for another model, 413 for a body over the limit, 429 when the
queue is full, 503 while shutting down."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm2trt.core.sampling import Sampling

MAX_STOPS = 8
MAX_LOGPROBS = 5  # /v1/completions' `logprobs`, as the API bounds it
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' `top_logprobs`
DEFAULT_COMPLETION_TOKENS = 16  # the API's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # the API's "up to the context" would reserve the whole context's blocks
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An answer in the API's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 429: "rate_limit_error", 503: "server_busy"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of 4300+ digits, nesting
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _number(
    body: Mapping[str, Any], key: str, default: float, low: float, high: float, *, open_low: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number", key)
    if value < low or value > high or (open_low and value == low):
        side = f"{'more than' if open_low else 'at least'} {low}"
        raise ApiError(400, f"{key} must be {side} and at most {high}", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", key)
    if not low <= value <= high:
        raise ApiError(400, f"{key} must be between {low} and {high}", key)
    return value


def _unsupported(body: Mapping[str, Any]) -> None:
    """Fields whose other values change the answer in ways this server does not compute: refused,
    never silently ignored."""
    neutral: dict[str, tuple[Any, ...]] = {
        "n": (None, 1),
        "best_of": (None, 1),
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
        "suffix": (None, ""),
        "tools": (None, []),
        "response_format": (None, {"type": "text"}),
    }
    for key, allowed in neutral.items():
        value = body.get(key)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ApiError(400, f"{key}={json.dumps(value)[:40]} is not supported by this server", key)


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(values) > MAX_STOPS or any(len(v) > 256 for v in values):
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings of at most 256 characters", "stop")
    return tuple(v for v in values if v)


@dataclass(frozen=True)
class Params:
    """What one request asks for, checked."""

    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # the chosen tokens' log-probabilities and this many alternatives; None: none
    echo: bool = False  # completions: the prompt's text (and its tokens' logprobs) before the completion


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """Completions: `logprobs` N (alternatives). Chat: `logprobs` true and `top_logprobs` N."""
    if not chat:
        return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, "logprobs must be true or false", "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return top if wanted else None


def params(body: Mapping[str, Any], *, chat: bool, random_seed: int) -> Params:
    _unsupported(body)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = DEFAULT_CHAT_TOKENS if chat else DEFAULT_COMPLETION_TOKENS
    max_tokens = _integer(body, key, default, 1, 1 << 20)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    top_k = _integer(body, "top_k", 0, -1, 1 << 20)
    seed = _integer(body, "seed", random_seed, -(1 << 63), (1 << 64) - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", "stream_options")
    sampling = Sampling(
        max_new_tokens=max_tokens or default,
        temperature=temperature,
        top_k=max(top_k or 0, 0),
        top_p=top_p,
        seed=(seed or 0) % (1 << 63),
    )
    usage = bool(options.get("include_usage", False))
    echo = body.get("echo")
    if echo is not None and (not isinstance(echo, bool) or (chat and echo)):
        raise ApiError(400, "echo must be true or false, and only completions echo the prompt", "echo")
    return Params(sampling, _stops(body), bool(stream), usage, _logprobs(body, chat), bool(echo))


def prompt_of(body: Mapping[str, Any]) -> str | list[int]:
    """/v1/completions' prompt: text or token ids, one of them (a list of one is taken as that one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request: send each prompt as its own request", "prompt")
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids", "prompt")


def messages_of(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """/v1/chat/completions' messages, each a role and its text (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role, one of {', '.join(ROLES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(p for p in parts if isinstance(p, str))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", "messages")
        out.append({"role": str(message["role"]), "content": content})
    return out
