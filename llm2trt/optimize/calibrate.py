"""Calibration for `optimize --quant`: run the graph being quantized in ONNX Runtime over windows of
a text file and collect per-channel statistics of the tensors the quantization pass asks for.

The text is tokenized with the artifact's tokenizer and cut into windows of `sequence` tokens (the
first `samples` of them); each window is one fresh prefill. An artifact without a tokenizer (the
tiny test models) calibrates on the text's UTF-8 bytes as token ids. Memory stays bounded: the pass
keeps per-channel vectors, plus a fixed number of sampled tokens per tensor for AWQ, and ONNX
Runtime holds one window's activations at a time.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.log import plural, progress, step
from llm2trt.core.manifest import GraphSpec, Manifest
from llm2trt.core.quant import Calibration, QuantRequest
from llm2trt.passes.manager import Model
from llm2trt.passes.quant_math import ActStats

logger = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no text file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as UTF-8 text: {exc}") from None


class TextCalibrator:
    """Calibration windows from a text file, run through a graph with `graph`'s interface."""

    def __init__(self, graph: GraphSpec, windows: list[list[int]], text: Path, digest: str) -> None:
        self.graph, self.windows, self.text, self.digest = graph, windows, text, digest
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
        if request.calib is None:
            raise InputError(f"--quant {request.method} calibrates its scales: pass --calib TEXTFILE")
        path = Path(request.calib)
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
        return cls(graph, windows[: request.calib_samples], path, digest)

    @property
    def record(self) -> Calibration | None:
        return self._record

    def observe(self, model: Model, tensors: dict[str, int], rows: int) -> dict[str, ActStats]:
        from llm2trt.backends.decoder import open_session
        from llm2trt.backends.onnxruntime.decoder import ort_executor
        from llm2trt.core.artifact import save_onnx

        start = time.perf_counter()
        stats = {name: ActStats(channels, rows, seed=i) for i, (name, channels) in enumerate(tensors.items())}
        known = model.graph.tensors()
        longest = max(len(w) for w in self.windows)
        what = f"calibrating on {self.text.name} ({plural(len(self.windows), 'window')} of up to {longest} tokens)"
        # Saving the graph and starting ONNX Runtime take a while on a real model: say so before the first window.
        with step(what), tempfile.TemporaryDirectory(prefix="llm2trt-calib-") as tmp:
            proto = model.to_onnx()
            for name in tensors:
                dtype = DType.parse(known[name].dtype).onnx
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
            save_onnx(proto, Path(tmp), "calibrate.onnx", source=model.weights_dir)
            del proto
            executor = ort_executor(str(Path(tmp) / "calibrate.onnx"))

            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                out = executor(feeds)
                for name, stat in stats.items():
                    stat.update(out.pop(name))
                return out

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
        return stats
