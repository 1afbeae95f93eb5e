"""The demo's serving step: `llm2trt serve ART` on a free port, four questions at once through the
official openai client (streamed chat completions, one batch on the server), the answers printed,
then SIGTERM: the server drains and must exit 0.

    python scripts/serve_demo.py out/demo/smollm2/opt
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from common import ServeError, ServerProcess

QUESTIONS = (
    "What is the capital of France?",
    "What is the capital of Germany?",
    "What is 2 + 2?",
    "How many days are in a week?",
)


async def ask(url: str) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=300)

    async def one(question: str) -> str:
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    return await asyncio.gather(*(one(q) for q in QUESTIONS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a SmolLM2 decoder artifact")
    artifact = parser.parse_args().artifact
    if not artifact.is_dir():
        parser.error(f"{artifact} is not an artifact directory")
    started = time.perf_counter()
    try:
        server = ServerProcess(artifact, ["--name", "smollm2"])
    except ServeError as exc:
        print(f"serve_demo: {exc}", file=sys.stderr)
        return 1
    print(f"  listening on {server.url} after {time.perf_counter() - started:.1f} s")
    try:
        answers = asyncio.run(ask(server.url or ""))
    finally:
        code = server.stop(timeout=60)
    for question, answer in zip(QUESTIONS, answers, strict=True):
        print(f"  {question} -> {answer.strip()!r}")
    print(f"  SIGTERM: drained, exit {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
