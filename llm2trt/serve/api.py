"""The HTTP face of the engine: OpenAI's `/v1/completions`, `/v1/chat/completions` (streamed as
server-sent events or whole) and `/v1/models`, plus `/health` and Prometheus `/metrics`.

Starlette routes the requests and uvicorn (h11) speaks HTTP: both well kept, small, and asyncio, so
one event loop holds every open stream while the engine thread runs the model. Nothing here parses
HTTP by hand. Bodies are read up to a byte limit; every refusal is the API's error object with a
4xx status. A stream whose client goes away cancels its request: its blocks are back in the pool
within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llm2trt.core.errors import InputError
from llm2trt.core.lora import NO_ADAPTER
from llm2trt.serve.engine import Busy, Engine, Event, Request, TokenLogprob
from llm2trt.serve.metrics import Metrics
from llm2trt.serve.protocol import ApiError, Params, messages_of, params, parse_json, prompt_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class _Stream(StreamingResponse):
    """A stream that runs `on_close` however it ends: finished, failed, or its client gone."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Service:
    """One model behind the API."""

    def __init__(self, engine: Engine, metrics: Metrics, options: ServeOptions) -> None:
        self.engine, self.metrics, self.options = engine, metrics, options
        loaded = engine.scheduler.loaded
        self.name, self.tokenizer = loaded.name, loaded.tokenizer
        self.adapters = loaded.adapters  # LoRA adapters, served as models of their own
        self.created = int(time.time())

    # -- plumbing ----------------------------------------------------------------------------------

    def _authorize(self, request: HttpRequest) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)")

    async def _body(self, request: HttpRequest) -> dict[str, Any]:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
        return parse_json(bytes(raw))

    def _model(self, body: dict[str, Any]) -> tuple[str, int]:
        """The model a request names (absent: the base model) and its LoRA slot."""
        model = body.get("model")
        if model is None or model == self.name:
            return self.name, NO_ADAPTER
        if isinstance(model, str) and model in self.adapters:
            return model, self.adapters[model]
        names = ", ".join(repr(n) for n in [self.name, *self.adapters])
        raise ApiError(404, f"the model {str(model)[:100]!r} does not exist; this server has {names}", "model")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        ids: list[int] = list(self.tokenizer(prompt).input_ids)
        return ids

    def _text(self, ids: list[int]) -> str:
        """Token ids as text (the ids themselves where the model has no tokenizer)."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        text: str = self.tokenizer.decode(ids, skip_special_tokens=False)
        return text

    def _piece(self, token: int) -> str:
        """One token's text, as logprobs name it."""
        return self._text([token])

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from llm2trt.convert.tokenizer import conversation_ids

        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            return conversation_ids(self.tokenizer, messages)
        except Exception as exc:  # the template's own refusal (roles out of order, ...)
            raise ApiError(400, f"the chat template refused these messages: {str(exc)[:200]}", "messages") from None

    async def guarded(self, request: HttpRequest, handler: Callable[[HttpRequest], Any]) -> Response:
        try:
            self._authorize(request)
            response: Response = await handler(request)
            return response
        except ApiError as exc:
            self.metrics.reject(exc.status)
            return _error(exc)

    # -- the API -----------------------------------------------------------------------------------

    async def completions(self, request: HttpRequest) -> Response:
        body = await self._body(request)
        model = self._model(body)
        prompt = prompt_of(body)
        ids = self._encode(prompt)
        p = params(body, chat=False, random_seed=secrets.randbits(63))
        echo = (prompt if isinstance(prompt, str) else self._text(ids)) if p.echo else None
        return await self._run(request, ids, p, model, echo=echo)

    async def chat(self, request: HttpRequest) -> Response:
        body = await self._body(request)
        model = self._model(body)
        ids = self._chat_ids(messages_of(body))
        p = params(body, chat=True, random_seed=secrets.randbits(63))
        return await self._run(request, ids, p, model, chat=True)

    async def _run(
        self,
        http: HttpRequest,
        ids: list[int],
        p: Params,
        model: tuple[str, int],
        *,
        chat: bool = False,
        echo: str | None = None,
    ) -> Response:
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request = Request(rid, ids, p.sampling, sink, p.stops, slot=model[1], logprobs=p.logprobs, echo=p.echo)
        try:
            self.engine.submit(request)
        except InputError as exc:
            raise ApiError(400, str(exc), "messages" if chat else "prompt", "context_length_exceeded") from None
        except Busy as exc:
            raise ApiError(exc.status, str(exc)) from None
        shape = _Shape(request.id, model[0], chat, len(ids), self._piece, echo)
        if p.stream:
            return _Stream(self._sse(events, shape, p.include_usage), lambda: self.engine.cancel(request.id))
        return await self._whole(http, events, shape, request.id)

    async def _whole(self, http: HttpRequest, events: asyncio.Queue[Event], shape: _Shape, rid: str) -> Response:
        text: list[str] = [shape.echo] if shape.echo is not None else []
        offset = len(shape.echo or "")  # characters so far: the next token's text offset
        tokens: list[int] = []
        scores: list[tuple[int, TokenLogprob]] = []  # (text offset, the token's logprobs)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                scores += shape.prompt_scores(event)
                scores += [(offset, score) for score in event.logprobs]
                text.append(event.text)
                offset += len(event.text)
                tokens += event.token_ids
                if event.finish is not None:
                    break
        finally:
            self.engine.cancel(rid)  # a no-op once it finished; frees it where the client left
        if event.finish == "error":
            return _error(ApiError(500, event.error or "the model failed on this request"))
        if event.finish == "cancelled":
            return _error(ApiError(503, "the server shut down before this request finished"))
        return JSONResponse(shape.whole("".join(text), tokens, event, scores or None))

    async def _sse(self, events: asyncio.Queue[Event], shape: _Shape, usage: bool) -> AsyncIterator[str]:
        if shape.chat:
            yield _data(shape.chunk({"role": "assistant", "content": ""}, None, ()))
        sent = 0  # characters of text so far: the next token's text offset
        echo = shape.echo
        while True:
            event = await events.get()
            if echo is not None and event.finish not in ("error", "cancelled"):  # the prompt, once, first
                yield _data(shape.chunk(echo, None, (), shape.prompt_scores(event) or None))
                sent, echo = len(echo), None
            if event.finish in ("error", "cancelled"):
                why = event.error or "the server shut down before this request finished"
                yield _data(ApiError(500 if event.finish == "error" else 503, why).body())
                break
            if event.text or event.token_ids or event.finish:
                content = {"content": event.text} if shape.chat else event.text
                scores = [(sent, score) for score in event.logprobs] if event.logprobs else None
                yield _data(shape.chunk(content, event.finish, event.token_ids, scores))
                sent += len(event.text)
            if event.finish is not None:
                if usage:
                    yield _data({**shape.head(), "choices": [], "usage": shape.usage(event)})
                break
        yield "data: [DONE]\n\n"

    async def models(self, request: HttpRequest) -> Response:
        base = {"id": self.name, "object": "model", "created": self.created, "owned_by": "llm2trt"}
        adapters = [{**base, "id": name, "parent": self.name} for name in self.adapters]
        return JSONResponse({"object": "list", "data": [base, *adapters]})


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class _Shape:
    """The response objects of one request, whole or in chunks."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int
    piece: Callable[[int], str]  # a token's text
    echo: str | None = None  # the prompt's text, before the completion's

    def prompt_scores(self, event: Event) -> list[tuple[int, TokenLogprob]]:
        """The echoed prompt's tokens' logprobs, each at its text offset (the sum of the pieces
        before it: a token's own text, as logprobs name it)."""
        out, offset = [], 0
        for score in event.prompt_logprobs:
            out.append((offset, score))
            offset += len(self.piece(score[0]))
        return out

    def head(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model}

    def usage(self, event: Event) -> dict[str, int]:
        done = event.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def logprobs(self, scores: list[tuple[int, TokenLogprob]] | None) -> dict[str, Any] | None:
        """The API's logprobs object: chat's `content` list, or completions' parallel lists."""
        if scores is None:
            return None
        if self.chat:

            def entry(token: int, value: float | None) -> dict[str, Any]:
                text = self.piece(token)
                return {"token": text, "logprob": value, "bytes": list(text.encode())}

            return {"content": [{**entry(t, v), "top_logprobs": [entry(*a) for a in top]} for _, (t, v, top) in scores]}
        return {
            "tokens": [self.piece(t) for _, (t, _v, _top) in scores],
            "token_logprobs": [v for _, (_t, v, _top) in scores],
            "top_logprobs": [None if v is None else {self.piece(a): av for a, av in top} for _, (_t, v, top) in scores],
            "text_offset": [offset for offset, _ in scores],
        }

    def chunk(
        self,
        content: Any,
        finish: str | None,
        tokens: tuple[int, ...],
        scores: list[tuple[int, TokenLogprob]] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": list(tokens)}
        choice.update({"delta": content} if self.chat else {"text": content})
        choice["logprobs"] = self.logprobs(scores)
        return {**self.head(), "choices": [choice]}

    def whole(
        self, text: str, tokens: list[int], event: Event, scores: list[tuple[int, TokenLogprob]] | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish, "token_ids": tokens}
        choice["logprobs"] = self.logprobs(scores)
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head(), "object": kind, "choices": [choice], "usage": self.usage(event)}


def app(service: Service) -> Starlette:
    async def health(request: HttpRequest) -> Response:
        if not service.engine.accepting or service.engine.failure is not None:
            return _error(ApiError(503, service.engine.failure or "the server is shutting down"))
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    def api(handler: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
        async def endpoint(request: HttpRequest) -> Response:
            return await service.guarded(request, handler)

        return endpoint

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        service.metrics.reject(status)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(ApiError(status, message.get(status, str(getattr(exc, "detail", "") or "error"))))

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        logger.exception("internal error answering %s", request.url.path)
        service.metrics.reject(500)
        return _error(ApiError(500, f"internal error: {type(exc).__name__}"))

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", api(service.models)),
        Route("/v1/completions", api(service.completions), methods=["POST"]),
        Route("/v1/chat/completions", api(service.chat), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
