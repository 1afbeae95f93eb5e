"""Static scales of an INT8 KV cache (`optimize --kv-dtype int8`), calibrated on text.

The artifact's own graph (its growing cache, as converted) runs over windows of the calibration
text in ONNX Runtime; each layer's cached keys (rotated, as the cache holds them) and values give
their largest magnitude per KV head and channel, and a scale of that over 127. A static scale per
channel keeps the attention kernels' reads one multiply: keys have a few channels (of the rotary
pairs) far larger than the rest, so one scale for a whole head would spend most codes on them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.kv import KV_KINDS, KVLayout, present_name
from llm2trt.core.log import plural, progress, step
from llm2trt.core.manifest import GraphSpec, Manifest

logger = logging.getLogger(__name__)

KV_CALIB_WINDOWS = 8  # windows of the text the scales see
KV_CALIB_SEQUENCE = 512
KV_CODES = 127
# Headroom over the calibrated amax: text the scales did not see reaches past it (docs/kv-cache.md).
KV_HEADROOM = 1.25

Scales = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (key, value) scales [kv_heads, head_dim]


def calibration_windows(artifact: Path, manifest: Manifest, text: Path, limit: int | None) -> list[list[int]]:
    """Token windows of `text` (the artifact's tokenizer; its bytes as ids without one)."""
    from llm2trt.convert.tokenizer import load_tokenizer, windows_of
    from llm2trt.optimize.calibrate import read_text

    content = read_text(text)
    tokenizer = load_tokenizer(artifact, manifest)
    if tokenizer is None:
        vocab = int(manifest.model_config.get("vocab_size", 256))
        ids = [b % vocab for b in content.encode("utf-8")]
    else:
        ids = list(tokenizer(content, add_special_tokens=False)["input_ids"])
    sequence = min(KV_CALIB_SEQUENCE, limit or KV_CALIB_SEQUENCE)
    windows = [w for w in windows_of(ids, sequence) if len(w) > 1][:KV_CALIB_WINDOWS]
    if not windows:
        raise InputError(f"--kv-dtype int8: {text} has fewer than 2 tokens to calibrate the cache's scales on")
    return windows


def kv_scales(onnx_path: Path, graph: GraphSpec, layout: KVLayout, windows: list[list[int]]) -> Scales:
    """Per layer, the key and value scales [kv_heads, head_dim] (float32) the windows call for."""
    from llm2trt.backends.decoder import open_session
    from llm2trt.backends.onnxruntime.segments import StreamedGraph

    if graph.kv_cache is None:
        raise InputError("--kv-dtype int8: the graph has no KV cache to calibrate")
    amax = {i: [np.zeros((layout.num_kv_heads, layout.head_dim)) for _ in range(2)] for i in range(layout.num_layers)}
    executor = StreamedGraph(onnx_path)  # one segment's weights at a time

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = executor(feeds)
        for layer, pair in amax.items():
            for j, kind in enumerate(KV_KINDS):
                cache = np.abs(out[present_name(layer, kind)].astype(np.float32))  # [B, KVH, S, D]
                np.maximum(pair[j], cache.max(axis=(0, 2)), out=pair[j])
        return out

    what = f"calibrating the INT8 KV cache ({plural(len(windows), 'window')})"
    with step(what):
        session = open_session(graph, run, capacity=max(len(w) for w in windows))
        for window in progress(windows, "KV calibration windows"):
            session.prompt_logits(window)
    scales: Scales = {}
    for layer, (key, value) in amax.items():
        pair = [np.maximum(a * KV_HEADROOM / KV_CODES, 1e-6).astype(np.float32) for a in (key, value)]
        scales[layer] = (pair[0], pair[1])
    return scales
