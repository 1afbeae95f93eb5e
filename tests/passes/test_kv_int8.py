"""The INT8 KV cache of the fast CUDA form (`optimize --kv-form gqa --kv-dtype int8`): the attention
op's reference body against float64 attention over the dequantized cache, the pass's graph (int8
cache I/O, calibrated scales), its tokens, and bad requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llm2trt.core.dtypes import DType
from llm2trt.core.manifest import Manifest
from llm2trt.core.sampling import Sampling
from llm2trt.generate.driver import generate
from llm2trt.passes.ort_ops import (
    attention_model,
    attention_reference,
    attention_values,
    dequantized_caches,
    int8_cache_values,
)
from tests.conftest import assert_clean_failure, run_cli, run_json

HEADS, KV_HEADS, HEAD, SLOTS = 4, 2, 64, 32


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("lengths", "seq", "total"), [([7, 5], 7, 7), ([9, 12], 1, 12)], ids=["prefill", "decode"])
def test_int8_cache_body_is_attention_over_the_dequantized_cache(
    qk_norm: bool, lengths: list[int], seq: int, total: int
) -> None:
    values = int8_cache_values(
        attention_values(lengths, seq, total, (HEADS, KV_HEADS, HEAD, SLOTS), np.float16, qk_norm=qk_norm)
    )
    for scale in ("KScale", "VScale"):  # cached values of about the size of the new ones
        values[scale] = values[scale] * 5
    model = attention_model(HEADS, KV_HEADS, HEAD, SLOTS, np.float16, qk_norm=qk_norm, int8_cache=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out, key, value = session.run(None, values)
    assert key.dtype == value.dtype == np.int8
    expected, keys = attention_reference(dequantized_caches(values), HEADS, KV_HEADS)
    scale = values["KScale"][:, None, :]
    for row, length in enumerate(lengths):
        past = 0 if seq == total else length - seq
        new = min(seq, length - past)
        ref = expected[row, :new]
        assert np.abs(out[row, :new] - ref).max() / np.abs(ref).max() < 5e-3
        # Every valid slot holds its key to within half a step (and fp16's rounding of the new ones).
        steps = np.abs(key[row, :, :length] * scale - keys[row, :, :length]) / scale
        assert steps.max() < 0.51


PROMPTS = [[5, 17, 99, 3, 250], [7, 8], [42, 11, 600, 31, 9, 77, 2]]


@pytest.fixture(scope="module")
def int8_cache(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("kv-int8")
    source = artifacts["tiny:llama"]
    assert run_cli("optimize", source, "-o", root / "fp", "--kv-form", "gqa", "-q").exit_code == 0
    code, report = run_json("optimize", source, "-o", root / "int8", "--kv-form", "gqa", "--kv-dtype", "int8", "-q")
    assert code == 0, report
    return root / "fp", root / "int8", report


def test_int8_cache_graph_has_int8_cache_io_and_calibrated_scales(int8_cache: tuple[Path, Path, dict]) -> None:
    _fp, int8, report = int8_cache
    counts = next(p["counts"] for p in report["passes"] if p["name"] == "kv_int8")
    assert counts == {"int8_caches": 4, "layers": 2}
    manifest = Manifest.read(int8)
    graph = next(iter(manifest.graphs.values()))
    assert graph.kv_cache is not None and graph.kv_cache.dtype == "int8"
    caches = [t for t in (*graph.inputs, *graph.outputs) if "past_key_values" in t.name or "present" in t.name]
    assert len(caches) == 8 and {t.dtype for t in caches} == {DType.INT8}
    proto = onnx.load(str(int8 / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node if n.domain == "llm2trt"]
    assert ops.count("GroupQueryAttentionInt8KV") == 2 and "GroupQueryAttention" not in ops
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if "_scale" in i.name}
    assert len(scales) == 4 and all(s.shape == (KV_HEADS, 16) and (s > 0).all() for s in scales.values())
    # Keys carry the rotary pairs' large channels: their scales spread wider than one per head would.
    key = next(s for name, s in scales.items() if "key" in name)
    assert key.max() / key.min() > 1.5


def test_int8_cache_decodes_the_float_caches_tokens(int8_cache: tuple[Path, Path, dict]) -> None:
    fp, int8, _report = int8_cache
    want = generate(fp, ids=PROMPTS, sampling=Sampling(16))
    got = generate(int8, ids=PROMPTS, sampling=Sampling(16))
    assert [r.new_ids for r in got.rows] == [r.new_ids for r in want.rows]


def test_int8_cache_needs_the_gqa_form(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("optimize", artifacts["tiny:llama"], "-o", out, "--kv-form", "fixed", "--kv-dtype", "int8")
    assert_clean_failure(result, "--kv-dtype int8 needs --kv-form gqa", out)
