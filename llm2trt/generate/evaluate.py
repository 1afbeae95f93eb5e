"""eval ppl: perplexity of a text file under an artifact, in ONNX Runtime (CPU or CUDA).

The text is tokenized whole with the artifact's tokenizer (no special tokens added) and cut into
non-overlapping windows of `window` tokens, the last one shorter. Each window starts fresh (no
context carried over) and scores its tokens 2..n from the logits of the positions before them;
perplexity is exp of the mean negative log-likelihood over every scored token. Any decoder
artifact works: cache-less or any cache form, fp32 or fp16/bf16, fused or quantized.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural, progress
from llm2trt.core.manifest import Manifest
from llm2trt.core.numerics import window_nll
from llm2trt.core.records import Record

DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class Perplexity(Record):
    ppl: float
    tokens: int  # tokens of the text
    windows: int
    scored: int  # tokens scored (each window's 2..n)
    nll: float  # mean negative log-likelihood per scored token
    window: int
    provider: str
    seconds: float

    def render(self) -> str:
        windows = f"{plural(self.windows, 'window')} of up to {self.window}"
        return (
            f"perplexity {self.ppl:.4f} over {plural(self.scored, 'scored token')} ({plural(self.tokens, 'token')}, "
            f"{windows}; {self.provider}, {self.seconds:.1f} s)"
        )


def perplexity(artifact: Path, text: Path, *, window: int = DEFAULT_WINDOW, provider: str = "cpu") -> Perplexity:
    from llm2trt.backends.decoder import Executor, open_session
    from llm2trt.backends.onnxruntime.decoder import ort_executor
    from llm2trt.convert.tokenizer import load_tokenizer, windows_of

    if window < 2:
        raise InputError(f"--window must be at least 2 tokens (got {window})")
    try:
        content = text.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no text file at {text}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {text} as UTF-8 text: {exc}") from None
    manifest = Manifest.read(artifact)
    manifest.require_whole("eval ppl")
    graph = manifest.graph()
    if manifest.task != "text-generation":
        raise InputError(f"eval ppl needs a decoder artifact; {artifact} is {manifest.task}")
    tokenizer = load_tokenizer(artifact, manifest)
    if tokenizer is None:
        raise InputError(f"{artifact} has no tokenizer (tiny models have none)")
    ids = list(tokenizer(content, add_special_tokens=False)["input_ids"])
    chunks = [c for c in windows_of(ids, window) if len(c) > 1]
    if not chunks:
        raise InputError(f"{text} has fewer than 2 tokens: nothing to score")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else None
    path = manifest.onnx_path(artifact, graph.name)
    if providers is None:
        from llm2trt.backends.onnxruntime.segments import StreamedGraph

        # A segment of weights at a time: a whole fp16 session on the CPU holds a float32 copy of
        # every weight too (1.1B: 4.94 GB, 2.24x the model).
        run: Executor = StreamedGraph(path)
    else:
        run = ort_executor(str(path), providers)
    session = open_session(graph, run, capacity=window)
    start = time.perf_counter()
    total = 0.0
    for chunk in progress(chunks, "scoring windows"):
        total += window_nll(session.prompt_logits(chunk), chunk)
    scored = sum(len(c) - 1 for c in chunks)
    nll = total / scored
    return Perplexity(math.exp(nll), len(ids), len(chunks), scored, nll, window, provider, time.perf_counter() - start)
