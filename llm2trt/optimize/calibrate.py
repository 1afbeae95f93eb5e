"""Calibration for `optimize --quant`: run the graph being quantized in ONNX Runtime over windows of
a text file and collect per-channel statistics of the tensors the quantization pass asks for.

The text is tokenized with the artifact's tokenizer and cut into windows of `sequence` tokens (the
first `samples` of them); each window is one fresh prefill. Without `--calib` the text is the one
the package ships (`llm2trt/data/calib_default.txt`, its sources in the README there). An artifact
without a tokenizer (the tiny test models) calibrates on the text's UTF-8 bytes as token ids. Memory
stays bounded: the pass keeps per-channel vectors, a fixed number of sampled tokens per tensor for
the searches, for GPTQ one [C, C] matrix per tensor, and ONNX Runtime holds one window's
activations at a time.

`--quant auto` also scores the graph with some of its weights replaced (`TextCalibrator.scoring`):
the mean negative log-likelihood of the windows that follow the calibration ones, or of the
calibration windows themselves when the text has no more.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural, progress, step
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.quant import Calibration, QuantRequest
from llm2trt.passes.manager import Model
from llm2trt.passes.quant_math import ActStats

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "calib_default.txt"  # in llm2trt/data/, packaged with llm2trt
SCORE_WINDOWS = 16  # windows --quant auto measures perplexity on
MIN_SCORE_WINDOWS = 4  # fewer held-out windows than this: it scores the calibration windows instead


def default_text() -> Path:
    """The calibration text shipped in the package (llm2trt/data/), as a file on disk."""
    path = Path(str(resources.files("llm2trt") / "data" / DEFAULT_TEXT))
    if not path.is_file():  # an install without its package data
        raise InputError(f"the built-in calibration text is missing ({path}): pass --calib TEXTFILE")
    return path


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no text file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as UTF-8 text: {exc}") from None


class TextCalibrator:
    """Calibration windows from a text file, run through a graph with `graph`'s interface."""

    def __init__(
        self,
        graph: GraphSpec,
        windows: list[list[int]],
        text: Path,
        digest: str,
        score: list[list[int]] | None = None,
        *,
        gram: bool = False,
    ) -> None:
        self.graph, self.windows, self.text, self.digest = graph, windows, text, digest
        # The windows --quant auto scores on: those after the calibration ones (None: the calibration ones).
        self.held_out = score is not None
        self.score_windows = score if score is not None else windows
        self.gram = gram  # sum x^T x of each tensor too (GPTQ)
        self._record: Calibration | None = None

    @classmethod
    def from_request(
        cls, artifact: Path, manifest: Manifest, graph: GraphSpec, request: QuantRequest, max_sequence: int | None
    ) -> TextCalibrator:
        """Windows of `request.calib_sequence` tokens, at most the model's positions (`max_sequence`)."""
        from llm2trt.convert.tokenizer import load_tokenizer, windows_of

        if manifest.task != "text-generation":
            raise InputError(
                f"--quant {request.method} calibrates on text: it needs a decoder artifact, not {manifest.task}"
            )
        path = Path(request.calib) if request.calib is not None else default_text()
        content = read_text(path)
        tokenizer = load_tokenizer(artifact, manifest)
        if tokenizer is None:
            vocab = int(manifest.model_config.get("vocab_size", 256))
            logger.warning("%s has no tokenizer: calibrating on the text's bytes as token ids", artifact)
            ids = [b % vocab for b in content.encode("utf-8")]
        else:
            ids = list(tokenizer(content, add_special_tokens=False)["input_ids"])
        sequence = min(request.calib_sequence, max_sequence or request.calib_sequence)
        windows = [w for w in windows_of(ids, sequence) if len(w) > 1]
        if not windows:
            raise InputError(f"--calib {path}: the text has fewer than 2 tokens")
        if len(windows) < request.calib_samples:  # fewer samples than asked would calibrate quietly worse
            raise InputError(
                f"--calib {path}: the text makes {plural(len(windows), 'calibration window')} of {sequence} tokens; "
                f"--calib-samples asks for {request.calib_samples} (give a longer text or fewer samples)"
            )
        digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
        from llm2trt.passes.quant_methods import METHODS

        method = METHODS.get(request.method)
        chosen = windows[: request.calib_samples]
        tokens = sum(len(w) for w in chosen)
        if tokens < method.min_calib_tokens:
            logger.warning(
                "--quant %s calibrates on %s of %s; under %s it loses accuracy (on SmolLM2-135M the methods level off "
                "at 8,192, docs/quantization.md): give a longer text or more --calib-samples",
                request.method,
                plural(tokens, "token"),
                path.name,
                plural(method.min_calib_tokens, "token"),
            )
        rest = windows[request.calib_samples : request.calib_samples + SCORE_WINDOWS]
        score = rest if len(rest) >= MIN_SCORE_WINDOWS else None
        if method.mixed and score is None:
            logger.warning(
                "%s has no %s beyond the %s calibration takes: --quant %s measures perplexity on the calibration "
                "windows themselves",
                path.name,
                plural(MIN_SCORE_WINDOWS, "window"),
                plural(len(chosen), "window"),
                request.method,
            )
        return cls(graph, chosen, path, digest, score, gram=method.needs_hessian)

    @property
    def record(self) -> Calibration | None:
        return self._record

    def observe(self, model: Model, tensors: dict[str, int], rows: int) -> dict[str, ActStats]:
        from llm2trt.backends.decoder import open_session
        from llm2trt.backends.onnxruntime.segments import StreamedGraph
        from llm2trt.core.artifact import save_onnx

        start = time.perf_counter()
        stats = {
            name: ActStats(channels, rows, seed=i, gram=self.gram) for i, (name, channels) in enumerate(tensors.items())
        }
        longest = max(len(w) for w in self.windows)
        what = f"calibrating on {self.text.name} ({plural(len(self.windows), 'window')} of up to {longest} tokens)"
        # Saving the graph and starting ONNX Runtime take a while on a real model: say so before the first window.
        with step(what), tempfile.TemporaryDirectory(prefix="llm2trt-calib-") as tmp:
            save_onnx(model.to_onnx(), Path(tmp), "calibrate.onnx", source=model.weights_dir)
            # A segment's weights at a time; each observed tensor goes into its statistics as it is
            # made, so one window holds one segment's activations, not every observed tensor's.
            run = StreamedGraph(
                Path(tmp) / "calibrate.onnx", taps=list(tensors), sink=lambda name, value: stats[name].update(value)
            )
            session = open_session(self.graph, run, capacity=longest)
            for window in progress(self.windows, "calibration windows"):
                session.prompt_logits(window)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._record = Calibration(
            text=self.text.name,
            sha256=self.digest,
            samples=len(self.windows),
            tokens=sum(len(w) for w in self.windows),
            seconds=round(time.perf_counter() - start, 3),
            peak_rss_mb=round(peak, 1),
        )
        record = self._record
        logger.info("calibration: %s in %.1f s, peak RSS %.0f MB", plural(record.tokens, "token"), record.seconds, peak)
        return stats

    @contextmanager
    def scoring(self, model: Model, replaceable: list[str]) -> Iterator[Callable[[dict[str, np.ndarray]], float]]:
        """The graph as it stands, run a segment at a time, with the constants named in `replaceable`
        open to replacement (a run feeds them to the segments that read them): a function of the
        replacements, the mean negative log-likelihood per scored token of the scoring
        windows (`eval ppl`'s arithmetic)."""
        from llm2trt.backends.decoder import open_session
        from llm2trt.backends.onnxruntime.segments import StreamedGraph
        from llm2trt.core.artifact import save_onnx
        from llm2trt.core.numerics import window_nll

        known = model.graph.tensors()
        missing = [name for name in replaceable if name not in known]
        if missing:
            raise ValueError(f"no weights named {', '.join(missing[:3])} to replace")
        longest = max(len(w) for w in self.score_windows)
        with (
            step("saving the graph to measure perplexity on"),
            tempfile.TemporaryDirectory(prefix="llm2trt-ppl-") as tmp,
        ):
            save_onnx(model.to_onnx(), Path(tmp), "score.onnx", source=model.weights_dir)
            # The replaced weights are feeds: the segments that read them take them as inputs.
            streamed = StreamedGraph(Path(tmp) / "score.onnx")

            def nll(weights: dict[str, np.ndarray]) -> float:
                def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                    return streamed({**feeds, **weights})

                session = open_session(self.graph, run, capacity=longest)
                total = sum(window_nll(session.prompt_logits(w), w) for w in progress(self.score_windows, "scoring"))
                return total / sum(len(w) - 1 for w in self.score_windows)

            yield nll
