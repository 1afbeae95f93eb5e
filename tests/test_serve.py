"""`llm2trt serve`: in-flight batching over the paged KV cache behind the OpenAI API, checked through
the official `openai` client against `llm2trt generate`, and under malformed requests, clients that
leave mid-stream, bodies over the limit and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import openai
import pytest

from llm2trt.core.errors import InputError
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from llm2trt.serve.blocks import BlockPool
from llm2trt.serve.protocol import ApiError, params
from llm2trt.serve.text import TextStream
from tests.conftest import assert_clean_failure, run_cli
from tests.serve_helpers import Server, serving


@pytest.fixture(scope="module")
def llama(artifacts: dict[str, Path]) -> Path:
    return artifacts["tiny:llama"]


def _prompts(count: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(1, longest))] for _ in range(count)]


def _alone(artifact: Path, prompt: list[int], sampling: Sampling) -> list[int]:
    return generate(artifact, ids=[prompt], sampling=sampling).rows[0].new_ids


async def _stream_ids(client: openai.AsyncOpenAI, prompt: list[int], **kw: Any) -> tuple[list[int], str | None]:
    stream = await client.completions.create(model="llama", prompt=prompt, stream=True, **kw)
    ids: list[int] = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            ids += (choice.model_extra or {}).get("token_ids", [])
            finish = choice.finish_reason or finish
    return ids, finish


def _client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


# -- the parts ---------------------------------------------------------------------------------------


def test_blocks_hold_each_sequence_where_its_table_says() -> None:
    pool = BlockPool(tensors=2, kv_heads=1, head_dim=2, block_size=4, blocks=6, dtype=np.dtype(np.float32))
    a, b = pool.reserve(10), pool.reserve(5)  # 3 and 2 blocks
    assert (pool.reserved, pool.in_use) == (5, 0)
    assert not pool.can_reserve(5)  # 2 blocks more: one is left
    entries = np.arange(2 * 1 * 7 * 2, dtype=np.float32).reshape(2, 1, 7, 2)
    pool.scatter(a, entries[:, :, :3])
    pool.scatter(a, entries[:, :, 3:])  # across a block boundary
    pool.scatter(b, -entries[:, :, :2])
    assert pool.in_use == 3
    past = pool.gather([a, b])
    assert past.shape == (2, 2, 1, 7, 2)
    np.testing.assert_array_equal(past[:, 0], entries)
    np.testing.assert_array_equal(past[:, 1, :, 5:], -entries[:, :, :2])
    assert not past[:, 1, :, :5].any()  # left padding
    with pytest.raises(InputError, match="outgrew"):
        pool.scatter(b, entries[:, :, :7])
    pool.release(a)
    pool.release(b)
    assert (pool.reserved, pool.in_use) == (0, 0)


def test_text_is_cut_at_a_stop_string_and_held_back_while_it_may_begin_one() -> None:
    class Letters:  # a tokenizer whose token i is the i-th letter
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    text = TextStream(Letters(), stops=("cde",))
    pieces = [text.add(i) for i in range(2)]
    assert pieces == ["a", "b"]
    assert text.add(2) == ""  # "c" may begin "cde"
    assert text.add(3) == ""
    assert (text.add(4), text.stopped) == ("", True)
    other = TextStream(Letters(), stops=("cx",))
    assert [other.add(i) for i in (0, 2)] == ["a", ""]
    assert other.add(3) == "cd"  # "cd" is no longer "cx"
    assert other.flush() == ""


def test_request_fields_are_checked_with_their_names() -> None:
    def refused(body: dict[str, Any]) -> ApiError:
        with pytest.raises(ApiError) as caught:
            params(body, chat=False, random_seed=0)
        return caught.value

    assert refused({"temperature": "hot"}).param == "temperature"
    assert refused({"max_tokens": 0}).param == "max_tokens"
    assert refused({"n": 2}).param == "n"
    assert refused({"stop": [1]}).param == "stop"
    assert refused({"top_p": 0}).param == "top_p"
    got = params({"max_tokens": 5, "temperature": 0, "stop": "x", "seed": -1}, chat=False, random_seed=0)
    assert (got.sampling.max_new_tokens, got.sampling.temperature, got.stops) == (5, 0.0, ("x",))


def test_a_request_that_fails_in_the_model_fails_alone(llama: Path) -> None:
    """A model call that raises is retried row by row; only the row that fails alone ends in error."""
    from llm2trt.serve.driver import ServeConfig, build
    from llm2trt.serve.engine import Event, Request

    service = build(llama, ServeConfig(kv_cache_mb=8))
    model = service.engine.model
    inner = model._run
    poison = 999

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (feeds["input_ids"] == poison).any():
            raise RuntimeError("poisoned row")
        return inner(feeds)

    model._run = run
    prompts = [[5, 6, 7], [8, poison, 9], [10, 11]]
    events: dict[int, list[Event]] = {i: [] for i in range(3)}
    sampling = Sampling(max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        service.engine.submit(Request(f"r{i}", prompt, sampling, events[i].append))
    deadline = time.monotonic() + 30
    while not all(e and e[-1].finish for e in events.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events[1][-1].finish == "error" and "poisoned row" in (events[1][-1].error or "")
    for i in (0, 2):
        ids = [t for e in events[i] for t in e.token_ids]
        assert ids == _alone(llama, prompts[i], sampling)
    assert service.engine.drain(time.perf_counter() + 5) == 0
    assert model.pool.in_use == 0 and model.pool.reserved == 0


# -- the server --------------------------------------------------------------------------------------


def test_64_concurrent_streams_give_generate_s_tokens(llama: Path) -> None:
    """64 streams at once through the openai client: each one's greedy tokens are `generate`'s for
    that prompt alone; long prompts are prefilled in chunks beside the others' decoding."""
    prompts = _prompts(64, longest=60)
    with serving(llama, "--chunk-tokens", "32", "--block-size", "8") as server:

        async def run() -> list[tuple[list[int], str | None]]:
            client = _client(server)
            return await asyncio.gather(*(_stream_ids(client, p, max_tokens=24, temperature=0) for p in prompts))

        got = asyncio.run(run())
        idle = server.wait_idle()
        assert server.stop() == 0
    sampling = Sampling(max_new_tokens=24)
    for prompt, (ids, finish) in zip(prompts, got, strict=True):
        assert ids == _alone(llama, prompt, sampling)
        assert finish == ("length" if len(ids) == 24 else "stop")
    assert idle["llm2trt_kv_blocks_in_use"] == idle["llm2trt_kv_blocks_reserved"] == 0
    assert idle['llm2trt_requests_total{finish_reason="length"}'] >= 1
    assert idle["llm2trt_engine_steps_total"] < 64 * 24  # batched: far fewer model calls than tokens


def _malformed(url: str) -> list[tuple[str, str, Any]]:
    """(method, path, body) of requests the API must refuse with a 4xx."""
    big_prompt = list(range(3, 300))  # more positions than the tiny model's 256
    return [
        ("POST", "/v1/completions", b"{not json"),
        ("POST", "/v1/completions", b"[1, 2]"),
        ("POST", "/v1/completions", {"prompt": [1, 2], "temperature": "warm"}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": -3}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "n": 3}),
        ("POST", "/v1/completions", {"prompt": []}),
        ("POST", "/v1/completions", {"prompt": "text, but no tokenizer"}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "model": "gpt-5"}),
        ("POST", "/v1/completions", {"prompt": [1, 10**9]}),
        ("POST", "/v1/completions", {"prompt": big_prompt}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 100000}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/chat/completions", {"messages": []}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "stop": [1]}),
        ("POST", "/v1/completions", {"prompt": [1, 2], "stream": "yes"}),
        ("GET", "/v1/completions", None),
        ("POST", "/v1/nothing", {"prompt": [1]}),
        ("POST", "/v1/completions", b"\xff\xfe"),
        ("POST", "/v1/completions", b"[" * 100000 + b"]" * 100000),  # nesting past the parser's depth
        ("POST", "/v1/completions", {"prompt": [[1, 2], [3]]}),
    ]


async def _send(client: httpx2.AsyncClient, method: str, path: str, body: Any) -> int:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = await client.request(method, path, content=content, headers={"content-type": "application/json"})
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
    return response.status_code


async def _leave_mid_stream(client: httpx2.AsyncClient, prompt: list[int]) -> int:
    """Read two events of a long stream, then close the connection."""
    body = {"prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                break
    return response.status_code


def test_200_requests_with_malformed_disconnected_and_oversized_ones(llama: Path) -> None:
    """200 requests at once: 20% malformed (each a 4xx with the API's error object), 10% leaving
    mid-stream, 5% over the body limit (413); no 5xx, the rest equal to `generate`, the server alive
    and every KV block back in the pool at the end."""
    rng = random.Random(1)
    kinds = ["bad"] * 40 + ["leave"] * 20 + ["big"] * 10 + ["ok"] * 130
    rng.shuffle(kinds)
    prompts = _prompts(200, seed=2, longest=30)
    limit_kb = 4
    with serving(llama, "--max-body-kb", str(limit_kb), "--max-batch", "32") as server:
        malformed = _malformed(server.url)

        async def run() -> list[Any]:
            api = _client(server)
            async with httpx2.AsyncClient(base_url=server.url, timeout=120) as raw:
                jobs = []
                for i, kind in enumerate(kinds):
                    if kind == "bad":
                        jobs.append(_send(raw, *malformed[i % len(malformed)]))
                    elif kind == "big":
                        body = {"prompt": [5] * (limit_kb * 400), "max_tokens": 2}  # 3 bytes a token
                        jobs.append(_send(raw, "POST", "/v1/completions", body))
                    elif kind == "leave":
                        jobs.append(_leave_mid_stream(raw, prompts[i]))
                    else:
                        jobs.append(_stream_ids(api, prompts[i], max_tokens=12, temperature=0))
                return await asyncio.gather(*jobs)

        results = asyncio.run(run())
        idle = server.wait_idle()
        alive = httpx2.get(f"{server.url}/health", timeout=10).status_code
        assert server.stop() == 0
    statuses = {kind: [r for r, k in zip(results, kinds, strict=True) if k == kind] for kind in ("bad", "big", "leave")}
    assert all(400 <= s < 500 for s in statuses["bad"]), statuses["bad"]
    assert statuses["big"] == [413] * 10
    assert statuses["leave"] == [200] * 20
    assert alive == 200
    sampling = Sampling(max_new_tokens=12)
    for i, kind in enumerate(kinds):
        if kind == "ok":
            assert results[i][0] == _alone(llama, prompts[i], sampling), i
    assert idle["llm2trt_kv_blocks_in_use"] == idle["llm2trt_kv_blocks_reserved"] == 0
    assert idle["llm2trt_requests_running"] == idle["llm2trt_requests_waiting"] == 0
    assert idle['llm2trt_requests_total{finish_reason="cancelled"}'] == 20  # every client that left
    assert not any(k.startswith("llm2trt_requests_rejected_total") and 'status="5' in k for k in idle)


def test_a_client_that_leaves_frees_its_blocks_at_once(llama: Path) -> None:
    with serving(llama, "--block-size", "4") as server:

        async def leave() -> None:
            async with httpx2.AsyncClient(base_url=server.url, timeout=60) as raw:
                body = {"prompt": [5, 6, 7], "max_tokens": 250, "temperature": 0, "stream": True}
                async with raw.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            break
                    held = server.metrics()["llm2trt_kv_blocks_reserved"]
                    assert held == 64  # 253 positions in blocks of 4
            left = time.monotonic()
            values = server.wait_idle(timeout=5)
            assert values["llm2trt_kv_blocks_reserved"] == 0
            assert time.monotonic() - left < 2

        asyncio.run(leave())
        assert server.stop() == 0


def test_sigterm_under_load_drains_and_exits_0(llama: Path) -> None:
    """SIGTERM with 48 streams running and more queued: the process exits 0 within the drain deadline,
    and every stream ends (finished, or told the server shut down), none hangs."""
    prompts = _prompts(48, seed=3, longest=20)
    with serving(llama, "--max-batch", "8", "--drain-seconds", "2") as server:

        async def load() -> tuple[list[Any], float]:
            async with httpx2.AsyncClient(base_url=server.url, timeout=60) as raw:

                async def one(prompt: list[int]) -> str:
                    body = {"prompt": prompt, "max_tokens": 230, "temperature": 0, "stream": True}
                    last = ""
                    try:
                        async with raw.stream("POST", "/v1/completions", json=body) as response:
                            async for line in response.aiter_lines():
                                last = line or last
                    except httpx2.HTTPError as exc:  # cut when the drain deadline passed
                        return f"cut: {type(exc).__name__}"
                    return last

                tasks = [asyncio.create_task(one(p)) for p in prompts]
                await asyncio.sleep(1.0)
                server.process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                done = await asyncio.gather(*tasks)
                return done, sent

        ends, sent = asyncio.run(load())
        code = server.process.wait(timeout=30)
        took = time.monotonic() - sent
    assert code == 0, "".join(server.stderr)
    assert took < 2 + 5, took
    assert all(end == "data: [DONE]" or end.startswith("cut") or "shut down" in end for end in ends), ends


def test_sampling_follows_each_request_s_seed(llama: Path) -> None:
    with serving(llama) as server:

        async def run() -> list[list[int]]:
            client = _client(server)
            jobs = [
                _stream_ids(client, [7, 8, 9], max_tokens=10, temperature=0.9, extra_body={"top_k": 20}, seed=s)
                for s in (5, 5, 6)
            ]
            return [ids for ids, _ in await asyncio.gather(*jobs)]

        same, again, other = asyncio.run(run())
        assert server.stop() == 0
    assert same == again == _alone(llama, [7, 8, 9], Sampling(10, temperature=0.9, top_k=20, seed=5))
    assert other != same


def test_api_key_and_stop_strings(llama: Path) -> None:
    with serving(llama, "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": "s3cret"}) as server:
        body = {"prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0}
        refused = httpx2.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        headers = {"Authorization": "Bearer s3cret"}
        whole = httpx2.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30).json()
        words = whole["choices"][0]["text"].split(" ")
        cut = httpx2.post(
            f"{server.url}/v1/completions", json={**body, "stop": f" {words[3]}"}, headers=headers, timeout=30
        ).json()
        assert server.stop() == 0
    assert cut["choices"][0]["text"] == " ".join(words[:3])
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_smollm2_chat_and_text_match_generate(smollm2_artifact: Path) -> None:
    """A real tokenizer and chat template: the chat answer is `generate --chat`'s, the text completion
    `generate`'s, streamed or whole."""
    question = "What is the capital of France?"
    with serving(smollm2_artifact, "--name", "smollm2") as server:

        async def run() -> tuple[str, str]:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
            chat = await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": question}],
                max_tokens=12,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            scores = chat.choices[0].logprobs.content if chat.choices[0].logprobs else []
            # Greedy: each chosen token is its own likeliest alternative.
            assert chat.usage is not None and len(scores) == chat.usage.completion_tokens
            assert all(s.top_logprobs[0].token == s.token and s.top_logprobs[0].logprob == s.logprob for s in scores)
            assert all(s.top_logprobs[0].logprob >= s.top_logprobs[1].logprob for s in scores)
            pieces = []
            stream = await client.completions.create(
                model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
            )
            async for chunk in stream:
                pieces += [c.text for c in chunk.choices]
            return chat.choices[0].message.content or "", "".join(pieces)

        chat, text = asyncio.run(run())
        assert server.stop() == 0
    sampling = Sampling(max_new_tokens=12)
    assert chat == generate(smollm2_artifact, prompts=[question], chat=True, sampling=sampling).rows[0].text
    expected = generate(smollm2_artifact, prompts=["The capital of France is"], sampling=Sampling(8)).rows[0].text
    assert text == expected
    assert "Paris" in chat


def test_serve_refuses_what_it_cannot_serve(artifacts: dict[str, Path], tmp_path: Path) -> None:
    assert_clean_failure(run_cli("serve", artifacts["tiny:bert"]), "needs a decoder artifact")
    assert_clean_failure(run_cli("serve", tmp_path / "missing"), "does not exist")
    assert_clean_failure(run_cli("serve", artifacts["tiny:llama"], "--api-key-env", "NO_SUCH_VAR_X"), "NO_SUCH_VAR_X")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        result = run_cli("serve", artifacts["tiny:llama"], "--port", port)
    assert_clean_failure(result, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def test_a_thousand_requests_leak_nothing(llama: Path) -> None:
    """1,200 requests, streamed and whole, 50 at a time: every block back, every request counted as
    finished, and the server's memory after the last 1,000 within a few MB of where it was after the
    first 200."""
    prompts = _prompts(1200, seed=4, longest=24)

    async def wave(server: Server, chunk: list[list[int]]) -> None:
        client, gate = _client(server), asyncio.Semaphore(50)

        async def one(i: int, prompt: list[int]) -> None:
            async with gate:
                if i % 2:
                    await _stream_ids(client, prompt, max_tokens=4, temperature=0)
                else:
                    await client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(chunk)))

    with serving(llama) as server:
        asyncio.run(wave(server, prompts[:200]))
        before = _rss_mb(server.process.pid)
        asyncio.run(wave(server, prompts[200:]))
        after = _rss_mb(server.process.pid)
        idle = server.wait_idle()
        assert server.stop() == 0
    finished = sum(v for k, v in idle.items() if k.startswith("llm2trt_requests_total"))
    assert finished == 1200
    assert idle["llm2trt_kv_blocks_in_use"] == idle["llm2trt_kv_blocks_reserved"] == 0
    assert after - before < 25, (before, after)


def test_a_full_queue_answers_429(llama: Path) -> None:
    with serving(llama, "--max-batch", "1", "--max-queue", "2") as server:

        async def run() -> list[int]:
            async with httpx2.AsyncClient(base_url=server.url, timeout=60) as raw:
                body = {"prompt": [5, 6], "max_tokens": 200, "temperature": 0}
                jobs = [_send(raw, "POST", "/v1/completions", body) for _ in range(8)]
                return await asyncio.gather(*jobs)

        statuses = asyncio.run(run())
        assert server.stop() == 0
    # The queue holds two (a third waits only once the engine has taken one into its batch).
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}


def test_lora_adapters_are_models_of_their_own(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """A graph with LoRA slots served with adapters a and b: requests naming a, b, the base model and
    a again run in one batch, each with `generate`'s tokens for that adapter (generate's are PEFT's:
    tests/test_lora.py); /v1/models lists them; a bad adapter set is one line at start-up."""
    from tests.test_lora import make_adapter

    base = artifacts["tiny:llama"]
    slots = tmp_path / "slots"
    assert run_cli("optimize", base, "-o", slots, "--lora-slots", "2", "--lora-max-rank", "8", "-q").exit_code == 0
    a = make_adapter("tiny:llama", tmp_path / "a", 1)
    b = make_adapter("tiny:llama", tmp_path / "b", 2, rank=8, use_rslora=True)
    prompts = _prompts(4, seed=5, longest=12)
    models = ["a", "b", "slots", "a"]
    with serving(slots, "--adapter", f"a={a}", "--adapter", f"b={b}") as server:
        listed = [m["id"] for m in httpx2.get(f"{server.url}/v1/models", timeout=10).json()["data"]]

        async def run() -> list[tuple[list[int], str | None]]:
            client = _client(server)
            jobs = [
                client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0)
                for m, p in zip(models, prompts, strict=True)
            ]
            done = await asyncio.gather(*jobs)
            return [((c.choices[0].model_extra or {})["token_ids"], c.model) for c in done]

        got = asyncio.run(run())
        unknown = httpx2.post(f"{server.url}/v1/completions", json={"model": "c", "prompt": [1]}, timeout=10)
        assert server.stop() == 0
    assert listed == ["slots", "a", "b"]
    assert [model for _, model in got] == models
    paths = {"a": f"a={a}", "b": f"b={b}", "slots": "none"}
    for (ids, _), model, prompt in zip(got, models, prompts, strict=True):
        assert ids == generate(slots, ids=[prompt], sampling=Sampling(10), adapters=[paths[model]]).rows[0].new_ids
    assert got[0][0] != got[2][0]  # the adapter moves the tokens
    assert unknown.status_code == 404 and "'slots', 'a', 'b'" in unknown.json()["error"]["message"]
    assert_clean_failure(run_cli("serve", base, "--adapter", f"a={a}"), "this artifact has no LoRA slots")
    three = ["--adapter", f"a={a}", "--adapter", f"b={b}", "--adapter", f"c={a}"]
    assert_clean_failure(run_cli("serve", slots, *three), "3 adapters do not fit this graph's 2 LoRA slots")
    assert_clean_failure(run_cli("serve", slots, "--adapter", f"slots={a}"), "the name 'slots' is taken")


def test_logprobs_are_transformers_log_softmax(llama: Path) -> None:
    """`logprobs`: each generated token's log-probability and the likeliest alternatives, as the
    transformers model gives them for that prefix; whole and streamed alike."""
    import torch

    from llm2trt.convert.sources import resolve_model
    from llm2trt.core.dtypes import DType

    prompt = [5, 9, 42, 7]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    with serving(llama) as server:
        whole = httpx2.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]

        async def streamed() -> list[Any]:
            client = _client(server)
            stream = await client.completions.create(model="llama", stream=True, **body)  # type: ignore[arg-type]
            return [c.choices[0].logprobs for c in [c async for c in stream] if c.choices and c.choices[0].logprobs]

        chunks = asyncio.run(streamed())
        chat = httpx2.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2},
            timeout=30,
        )
        assert server.stop() == 0
    ids = whole["token_ids"]
    model = resolve_model("tiny:llama").load(DType.FP32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].double()
    expected = torch.log_softmax(logits, dim=-1)
    got = whole["logprobs"]
    assert got["tokens"] == [str(t) for t in ids]
    np.testing.assert_allclose(got["token_logprobs"], [float(expected[i, t]) for i, t in enumerate(ids)], atol=1e-4)
    for i, top in enumerate(got["top_logprobs"]):
        best = torch.topk(expected[i], 3)
        assert list(top) == [str(int(t)) for t in best.indices]
        np.testing.assert_allclose(list(top.values()), best.values.tolist(), atol=1e-4)
    assert got["text_offset"][0] == 0 and got["text_offset"] == sorted(got["text_offset"])
    assert [lp for c in chunks for lp in c.token_logprobs] == pytest.approx(got["token_logprobs"], abs=1e-9)
    assert chat.status_code == 400  # no chat template on the tiny model, checked before logprobs matter


def test_echo_scores_the_prompt_as_transformers_does(llama: Path) -> None:
    """`echo` with `logprobs` (what evaluation harnesses send for log-likelihoods): every prompt token
    after the first scored given the tokens before it, across prefill chunks, equal to transformers'
    log-softmax; the text starts with the prompt's; streamed alike."""
    import torch

    from llm2trt.convert.sources import resolve_model
    from llm2trt.core.dtypes import DType

    prompt = _prompts(1, seed=6, longest=40)[0] + [5, 6, 7, 8, 9, 10, 11, 12]  # longer than one chunk
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True}
    with serving(llama, "--chunk-tokens", "8") as server:
        whole = httpx2.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
        with httpx2.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        refused = httpx2.post(f"{server.url}/v1/chat/completions", json={"messages": [], "echo": True}, timeout=30)
        assert server.stop() == 0
    scores = whole["logprobs"]
    assert whole["text"].startswith(" ".join(map(str, prompt)))
    assert scores["tokens"] == [str(t) for t in prompt + whole["token_ids"]]
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    model = resolve_model("tiny:llama").load(DType.FP32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + whole["token_ids"]])).logits[0, :-1].double()
    expected = torch.log_softmax(logits, dim=-1)
    sequence = prompt + whole["token_ids"]
    want = [float(expected[i - 1, t]) for i, t in enumerate(sequence) if i]
    np.testing.assert_allclose(scores["token_logprobs"][1:], want, atol=1e-4)
    first = events[0]["choices"][0]
    assert first["text"] == " ".join(map(str, prompt))
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(want[: len(prompt) - 1], abs=1e-4)
    assert refused.status_code == 400 and refused.json()["error"]["param"] in ("echo", "messages")
