"""llm2trt's CUDA kernel library for ONNX Runtime (plugins/csrc): it builds with nvcc here, loads
into ONNX Runtime, and its ops mean what their reference bodies say.

No GPU here: the library's CPU registrations (plain loops, the same op glue and shapes as the CUDA
ones) run in ONNX Runtime's CPU provider against the bodies ONNX Runtime runs without it. The CUDA
kernels themselves are checked on a CUDA GPU: scripts/check_ort_kernels.py (README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llm2trt.core.errors import BackendError
from llm2trt.passes.ort_ops import (
    OPS,
    attention_model,
    attention_reference,
    attention_values,
    dequantized_caches,
    int8_cache_values,
    one_op_model,
    reference,
    sample_values,
)
from llm2trt.plugins import ort_library as ort_kernels


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM2TRT_CACHE", str(cache))
        patch.delenv(ort_kernels.ENV_LIBRARY, raising=False)
        built = ort_kernels.library("sm_80")
        assert built.is_file() and built.is_relative_to(cache)
        assert ort_kernels.library("sm_80") == built  # cached: the same file, not a rebuild
    return built


def _session(model: onnx.ModelProto | str, library: Path | None) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(str(library))
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _one_op(name: str, rows: int, k: int, n: int, dtype: Any) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    feeds = sample_values(name, rows, k, n, dtype)
    return one_op_model(name, feeds), feeds


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("rows", [1, 3])
def test_library_ops_match_their_bodies(library: Path, name: str, rows: int) -> None:
    """Each op through the library and through its body: every output, against float64 as well."""
    model, feeds = _one_op(name, rows, 64, 24, np.float32)
    got = _session(model, library).run(None, feeds)
    want = _session(model, None).run(None, feeds)
    assert len(got) == len(OPS[name].outputs)
    for output, a, b in zip(OPS[name].outputs, got, want, strict=True):
        if a is None:  # the one-row path computes Y (and Sum) without staging Normed / GateUp
            assert rows == 1 and output in ("Normed", "GateUp"), output
            continue
        assert a.shape == b.shape, output
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), output
    exact = reference(name, feeds)
    assert np.abs(got[0] - exact).max() / np.abs(exact).max() < 1e-5
    # The body really ran without the library: a wrong reference would not match float64 either.
    assert np.abs(want[0] - exact).max() / np.abs(exact).max() < 1e-5


def test_library_runs_the_gqa_decoder_with_the_bodies_tokens(
    library: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """A whole --kv-form gqa graph (tiny llama, fp32): logits and caches through the library's ops
    equal the bodies', and the graph has no MatMul left for ONNX Runtime to run."""
    from tests.conftest import run_json

    code, report = run_json("optimize", artifacts["tiny:llama"], "-o", tmp_path / "gqa", "--kv-form", "gqa", "-q")
    assert code == 0, report
    path = str(tmp_path / "gqa" / "model.onnx")
    assert ort_kernels.graph_uses(path)
    with_library, bodies = _session(path, library), _session(path, None)
    rng = np.random.default_rng(0)
    for seq, past in ((5, 0), (1, 5)):
        feeds = _decoder_feeds(bodies, seq, past, np.float32, rng)
        got, want = with_library.run(None, feeds), bodies.run(None, feeds)
        for a, b in zip(got, want, strict=True):
            assert np.abs(a - b).max() < 1e-5


def _decoder_feeds(session: Any, seq: int, past: int, dtype: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two rows of `seq` new tokens after `past` cached ones, for a gqa graph (16 cache slots)."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in session.get_inputs():
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(0, 100, (2, seq)).astype(np.int64)
        elif tensor.name == "position_ids":
            feeds[tensor.name] = np.tile(np.arange(past, past + seq), (2, 1)).astype(np.int64)
        elif tensor.name == "seqlens_k":
            feeds[tensor.name] = np.full(2, past + seq - 1, np.int32)
        elif tensor.name == "total_sequence_length":
            feeds[tensor.name] = np.array(past + seq, np.int32)
        else:
            shape = [2 if d == "batch" else d if isinstance(d, int) else 16 for d in tensor.shape]
            feeds[tensor.name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return feeds


@pytest.mark.parametrize("name", sorted(n for n, op in OPS.items() if op.float_y))
@pytest.mark.parametrize("rows", [1, 3])
def test_library_logits_ops_give_float32_from_float16(library: Path, name: str, rows: int) -> None:
    """The F32 ops (the logits): float16 in, Y in float32 that float16 rounding never touched."""
    model, feeds = _one_op(name, rows, 64, 24, np.float16)
    got = _session(model, library).run(None, feeds)
    want = _session(model, None).run(None, feeds)
    exact = reference(name, feeds)
    for y in (got[0], want[0]):
        assert y.dtype == np.float32
        # The sum is rounded to float16 (the residual stream) and the body rounds Normed too.
        assert np.abs(y - exact).max() / np.abs(exact).max() < 2e-3
    assert (got[0] != got[0].astype(np.float16).astype(np.float32)).mean() > 0.9


def test_gqa_pass_gives_fp16_decoders_float32_logits(library: Path, tmp_path: Path) -> None:
    """fp16 tiny llama, `--kv-form gqa`: the lm_head (with the final norm) is SkipRMSNormLinearF32,
    the graph and its manifest give float32 logits and keep fp16 caches, and the library's logits
    follow the bodies'."""
    from llm2trt.core.dtypes import DType
    from llm2trt.core.manifest import Manifest
    from tests.conftest import run_json

    code, report = run_json("convert", "tiny:llama", "-o", tmp_path / "fp16", "--dtype", "fp16", "-q")
    assert code == 0, report
    code, report = run_json("optimize", tmp_path / "fp16", "-o", tmp_path / "gqa", "--kv-form", "gqa", "-q")
    assert code == 0, report
    counts = next(p["counts"] for p in report["passes"] if p["name"] == "ort_kernels")
    assert (counts["SkipRMSNormLinearF32"], counts["SkipRMSNormLinear"], counts["LinearF32"]) == (1, 1, 0)
    graph = Manifest.read(tmp_path / "gqa").graph()
    dtypes = {t.name: t.dtype for t in graph.outputs}
    assert dtypes["logits"] == DType.FP32 and dtypes["present.0.key"] == DType.FP16
    path = str(tmp_path / "gqa" / "model.onnx")
    with_library, bodies = _session(path, library), _session(path, None)
    rng = np.random.default_rng(0)
    for seq, past in ((5, 0), (1, 5)):
        feeds = _decoder_feeds(bodies, seq, past, np.float16, rng)
        got, want = with_library.run(None, feeds), bodies.run(None, feeds)
        assert got[0].dtype == want[0].dtype == np.float32
        assert np.abs(got[0] - want[0]).max() / np.abs(want[0]).max() < 3e-3
        assert np.array_equal(got[0].argmax(-1), want[0].argmax(-1))


@pytest.mark.parametrize("shape", [(4, 2, 16, 12), (8, 1, 64, 10)])
@pytest.mark.parametrize(
    ("case", "lengths", "seq", "total"),
    [
        ("first prompt, right-padded", [5, 3], 5, 5),
        ("prompt after a past (one row: the body takes no more)", [7], 3, 7),
        ("decode, rows of different lengths", [6, 2], 1, None),
    ],
)
def test_library_attention_matches_onnx_runtime_groupqueryattention(
    library: Path, shape: tuple[int, int, int, int], case: str, lengths: list[int], seq: int, total: int | None
) -> None:
    """llm2trt's GroupQueryAttention (its CPU registration: the same glue as the CUDA one) against its
    body, ONNX Runtime's own op, and against float64: the outputs of every real token and every
    cache slot it defines."""
    heads, kv_heads, head, capacity = shape
    model = attention_model(heads, kv_heads, head, capacity, np.float32)
    feeds = attention_values(lengths, seq, total or capacity, shape, np.float32, seed=1)
    got, want = _session(model, library).run(None, feeds), _session(model, None).run(None, feeds)
    exact, exact_keys = attention_reference(feeds, heads, kv_heads)
    for b, length in enumerate(lengths):
        past = 0 if seq == (total or capacity) else length - seq
        valid = min(seq, length - past)  # a padded prompt's tail is padding
        assert np.abs(got[0][b, :valid] - want[0][b, :valid]).max() < 1e-5, case
        assert np.abs(got[0][b, :valid] - exact[b, :valid]).max() < 1e-5, case
        assert np.abs(got[1][b, :, :length] - exact_keys[b, :, :length]).max() < 1e-5, case
        for cache in (1, 2):  # present key and value, up to the row's length
            assert np.abs(got[cache][b, :, :length] - want[cache][b, :, :length]).max() < 1e-5, case
    assert np.abs(want[0]).max() > 0.1  # the body computed something


INT8_SHAPE = (4, 2, 32, 16)  # heads, KV heads, head size, cache slots


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize(
    ("lengths", "seq", "total"),
    [([7, 5], 7, 7), ([10], 3, 10), ([9, 14], 1, 14)],
    ids=["prefill, right-padded", "prompt after a past", "decode, rows of different lengths"],
)
def test_library_int8_cache_attention_matches_its_body(
    library: Path, qk_norm: bool, lengths: list[int], seq: int, total: int
) -> None:
    """The Int8KV ops (their CPU registration: the glue and numerics of the CUDA kernels) against
    their body (dequantize, the float op, quantize back) run by ONNX Runtime, and against float64
    attention over the dequantized caches; float16 and float32, the valid rows of each row. Both
    attend over this call's new keys and values unquantized, so float32 agrees to float rounding."""
    heads, kv_heads, head, slots = INT8_SHAPE
    for dtype in (np.float16, np.float32):
        values = int8_cache_values(
            attention_values(lengths, seq, total, INT8_SHAPE, dtype, seed=3, qk_norm=qk_norm), seed=4
        )
        for scale in ("KScale", "VScale"):  # cached entries of about the size of the new ones
            values[scale] = values[scale] * 5
        model = attention_model(heads, kv_heads, head, slots, dtype, qk_norm=qk_norm, int8_cache=True)
        got = _session(model, library).run(None, values)
        want = _session(model, None).run(None, values)
        assert got[1].dtype == got[2].dtype == np.int8 and got[0].dtype == dtype
        exact, exact_keys = attention_reference(dequantized_caches(values), heads, kv_heads)
        bound = 3e-3 if dtype == np.float16 else 1e-5  # relative to the row's largest output
        k_scale = values["KScale"][:, None, :]
        for b, length in enumerate(lengths):
            past = 0 if seq == total else length - seq
            new = min(seq, length - past)
            top = float(np.abs(exact[b, :new]).max())
            assert np.abs(got[0][b, :new] - exact[b, :new]).max() / top < bound, (dtype, b)
            assert np.abs(got[0][b, :new].astype(np.float64) - want[0][b, :new]).max() / top < 2 * bound, (dtype, b)
            # Every valid key slot holds the reference's key to half a step, plus T's rounding of
            # the new ones before they are quantized; the codes equal the body's (a rounding tie
            # apart, one step at most).
            keys = exact_keys[b, :, :length]
            rounding = np.abs(keys) * (2.0**-10 if dtype == np.float16 else 1e-6)
            assert (np.abs(got[1][b, :, :length] * k_scale - keys) <= 0.5 * k_scale + rounding).all(), (dtype, b)
            for cache in (1, 2):
                apart = np.abs(got[cache][b, :, :length].astype(int) - want[cache][b, :, :length])
                assert apart.max() <= 1 and (apart > 0).mean() < 0.01, (dtype, b, cache)
            # The past stays as it was; the new values are their codes, round half to even.
            assert np.array_equal(got[1][b, :, :past], values["PastKey"][b, :, :past])
            assert np.array_equal(got[2][b, :, :past], values["PastValue"][b, :, :past])
            qkv = values["QKV"][b, :new].astype(np.float32).reshape(new, heads + 2 * kv_heads, head)
            codes = np.clip(np.round(qkv[:, heads + kv_heads :] / values["VScale"]), -127, 127).transpose(1, 0, 2)
            assert np.array_equal(got[2][b, :, past : past + new], codes.astype(np.int8)), (dtype, b)
        assert np.abs(want[0]).max() > 0.1  # the body computed something


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("KScale", lambda v: v[:, :-1], r"KScale and VScale must be float32 \[kv_num_heads, head_dim\]"),
        ("VScale", lambda v: v[:1], r"KScale and VScale must be float32 \[kv_num_heads, head_dim\]"),
    ],
)
def test_library_int8_cache_refuses_wrong_scales(library: Path, name: str, change: Any, message: str) -> None:
    """A scale of the wrong shape is one error line (the model is built with the right shapes, then
    fed the wrong one: ONNX Runtime leaves the custom op's inputs unchecked)."""
    heads, kv_heads, head, slots = INT8_SHAPE
    values = int8_cache_values(attention_values([3], 1, slots, INT8_SHAPE, np.float32, seed=1))
    model = attention_model(heads, kv_heads, head, slots, np.float32, int8_cache=True)
    for graph_input in model.graph.input:  # any shape at run time
        graph_input.type.tensor_type.ClearField("shape")
    del model.functions[:]
    values[name] = np.ascontiguousarray(change(values[name]))
    with pytest.raises(Exception, match="llm2trt GroupQueryAttentionInt8KV: " + message):
        _session(model, library).run(None, values)


def test_library_attention_refuses_what_it_does_not_compute(library: Path) -> None:
    model = attention_model(4, 2, 16, 8, np.float32, attrs={"rotary_interleaved": 1})
    with pytest.raises(Exception, match="rotary_interleaved=0"):
        _session(model, library)


def test_library_build_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2TRT_CACHE", str(tmp_path))
    monkeypatch.setenv(ort_kernels.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(BackendError, match=r"missing\.so, which is not a file"):
        ort_kernels.library("sm_90")
    monkeypatch.delenv(ort_kernels.ENV_LIBRARY)
    monkeypatch.setattr(ort_kernels, "nvcc", lambda: None)
    with pytest.raises(BackendError, match="no nvcc to build"):
        ort_kernels.library("sm_90")
    fake = tmp_path / "nvcc"
    fake.write_text(
        "#!/bin/sh\n"
        "[ \"$1\" = --version ] && echo 'Cuda compilation tools, fake' && exit 0\n"
        "echo 'nvcc fatal: boom' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(ort_kernels, "nvcc", lambda: fake)
    with pytest.raises(BackendError, match="nvcc fatal: boom"):
        ort_kernels.library("sm_90")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


def _gqa_graph_model(head: int, **attrs: Any) -> Any:
    """One com.microsoft.GroupQueryAttention over graph inputs, as `--kv-form gqa` writes it."""
    import onnx_graphsurgeon as gs

    from llm2trt.passes.manager import Model

    heads, kv_heads, slots = 4, 2, 32
    qkv = gs.Variable("qkv", np.float32, ["batch", "seq", (heads + 2 * kv_heads) * head])
    past = [gs.Variable(f"past_{kv}", np.float32, ["batch", kv_heads, slots, head]) for kv in "kv"]
    seqlens, total = gs.Variable("seqlens_k", np.int32, ["batch"]), gs.Variable("total", np.int32, [])
    tables = [gs.Constant(n, np.zeros((slots, head // 2), np.float32)) for n in ("cos", "sin")]
    outs = [gs.Variable(n, np.float32) for n in ("out", "present_k", "present_v")]
    base = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": 0.25, "do_rotary": 1, "rotary_interleaved": 0}
    empty = gs.Variable.empty()
    node = gs.Node(
        "GroupQueryAttention",
        "gqa",
        attrs={**base, "local_window_size": -1, **attrs},
        inputs=[qkv, empty, empty, *past, seqlens, total, *tables],
        outputs=outs,
        domain="com.microsoft",
    )
    graph = gs.Graph([node], [qkv, *past, seqlens, total], outs, opset=24)
    graph.import_domains = [onnx.helper.make_opsetid("", 24), onnx.helper.make_opsetid("com.microsoft", 1)]
    return Model(graph)


@pytest.mark.parametrize(
    ("head", "attrs", "refusal"),
    [
        (16, {}, None),
        (64, {}, None),
        (16, {"local_window_size": 8}, None),  # a sliding window (Gemma 3's local layers): the kernels take it
        (16, {"local_window_size": 0}, "GroupQueryAttention with a local window under one key"),
        (16, {"softcap": 30.0}, "GroupQueryAttention with softcap"),
        (48, {}, "GroupQueryAttention with a head size other than 16, 32, 64, 128 or 256"),
    ],
)
def test_pass_takes_only_the_attention_its_kernels_compute(
    head: int, attrs: dict[str, Any], refusal: str | None
) -> None:
    from llm2trt.passes.ort_ops import OrtKernelsPass

    model = _gqa_graph_model(head, **attrs)
    counts = OrtKernelsPass().run(model).counts
    ops = [(n.domain, n.op) for n in model.graph.nodes]
    if refusal is None:
        assert counts["GroupQueryAttention"] == 1 and ops == [("llm2trt", "GroupQueryAttention")]
        assert [i.name for i in model.graph.nodes[0].inputs] == [
            "qkv",
            "past_k",
            "past_v",
            "seqlens_k",
            "total",
            "cos",
            "sin",
        ]
        return
    assert counts["GroupQueryAttention"] == 0 and ops == [("com.microsoft", "GroupQueryAttention")]
    assert counts[f"not fused ({refusal})"] == 1


def test_an_installed_llm2trt_carries_every_kernel_source() -> None:
    """The library builds from plugins/csrc on the user's machine: each source there must be
    package data, or an installed copy fails to compile (an #include it lacks)."""
    import fnmatch
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    # The package-data line (tomllib is 3.11+; the project supports 3.10).
    line = re.search(r'^"llm2trt\.plugins\.csrc" = (\[.*\])$', (root / "pyproject.toml").read_text(), re.M)
    assert line is not None
    patterns = json.loads(line.group(1))
    sources = sorted(p.name for p in (root / "plugins" / "csrc").iterdir() if p.is_file())
    assert "llm2trt_attention.cuh" in sources
    assert [s for s in sources if not any(fnmatch.fnmatch(s, p) for p in patterns)] == []


def _ort_indices() -> dict[str, int]:
    """ort_abi.h's indices into ONNX Runtime's API table."""
    import re

    text = (Path(ort_kernels.SOURCES) / "ort_abi.h").read_text()
    block = text[text.index("namespace ort_index") :]
    return {name: int(index) for name, index in re.findall(r"(\w+) = (\d+),", block[: block.index("};")])}


class _FakeApi:
    """A stand-in for ONNX Runtime's API table with the entries RegisterCustomOps and a kernel's
    creation call: it records the ops added and the attributes asked for."""

    def __init__(self) -> None:
        import ctypes
        from collections.abc import Callable
        from typing import ClassVar

        status, ptr = ctypes.c_void_p, ctypes.c_void_p
        self.ops: list[int] = []
        self.asked: list[tuple[str, str]] = []
        values = {
            "num_heads": 4,
            "kv_num_heads": 2,
            "do_rotary": 1,
            "rotary_interleaved": 0,
            "local_window_size": -1,
            "first_expert": 0,
            "bits": 4,
            "block_size": 32,
        }

        def domain(name: bytes, out: Any) -> None:
            assert name == b"llm2trt"
            out[0] = 1

        def attr(kind: str) -> Callable[[int, bytes, Any], None]:
            def read(info: int, name: bytes, out: Any) -> None:
                self.asked.append((name.decode(), kind))
                out[0] = 0.5 if kind == "float" else values[name.decode()]

            return read

        self.callbacks = {  # kept alive as long as the table points at them
            "CreateStatus": ctypes.CFUNCTYPE(status, ctypes.c_int, ctypes.c_char_p)(lambda code, message: 1),
            "CreateCustomOpDomain": ctypes.CFUNCTYPE(status, ctypes.c_char_p, ctypes.POINTER(ptr))(domain),
            "CustomOpDomain_Add": ctypes.CFUNCTYPE(status, ptr, ptr)(lambda d, op: self.ops.append(op)),
            "AddCustomOpDomain": ctypes.CFUNCTYPE(status, ptr, ptr)(lambda options, d: None),
            "KernelInfoGetAttribute_float": ctypes.CFUNCTYPE(
                status, ptr, ctypes.c_char_p, ctypes.POINTER(ctypes.c_float)
            )(attr("float")),
            "KernelInfoGetAttribute_int64": ctypes.CFUNCTYPE(
                status, ptr, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)
            )(attr("int")),
        }
        index = _ort_indices()
        self.table = (ctypes.c_void_p * (max(index.values()) + 1))()
        for name, callback in self.callbacks.items():
            self.table[index[name]] = ctypes.cast(callback, ctypes.c_void_p).value
        self.get_api = ctypes.CFUNCTYPE(ptr, ctypes.c_uint32)(lambda version: ctypes.addressof(self.table))
        self.version = ctypes.CFUNCTYPE(ctypes.c_char_p)(lambda: b"probe")

        class ApiBase(ctypes.Structure):
            _fields_: ClassVar = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.c_void_p)]

        self.base = ApiBase(*(ctypes.cast(f, ctypes.c_void_p).value for f in (self.get_api, self.version)))


def _custom_op_struct() -> Any:
    """ort_abi.h's OrtCustomOp, as far as the registration test reads it."""
    import ctypes
    from typing import ClassVar

    ptr = ctypes.c_void_p
    name_fn = ctypes.CFUNCTYPE(ctypes.c_char_p, ptr)
    count_fn = ctypes.CFUNCTYPE(ctypes.c_size_t, ptr)
    at_fn = ctypes.CFUNCTYPE(ctypes.c_int, ptr, ctypes.c_size_t)

    class CustomOp(ctypes.Structure):
        _fields_: ClassVar = [
            ("version", ctypes.c_uint32),
            ("CreateKernel", ptr),
            ("GetName", name_fn),
            ("GetExecutionProviderType", name_fn),
            ("GetInputType", at_fn),
            ("GetInputTypeCount", count_fn),
            ("GetOutputType", at_fn),
            ("GetOutputTypeCount", count_fn),
            ("KernelCompute", ptr),
            ("KernelDestroy", ctypes.CFUNCTYPE(None, ptr)),
            ("GetInputCharacteristic", at_fn),
            ("GetOutputCharacteristic", at_fn),
            ("GetInputMemoryType", at_fn),
            ("variadic", ptr * 4),
            ("CreateKernelV2", ctypes.CFUNCTYPE(ptr, ptr, ptr, ptr, ctypes.POINTER(ptr))),
        ]

    return CustomOp


def _registrations(library: Path, tmp_path: Path) -> list[tuple[Any, ...]]:
    """What RegisterCustomOps hands ONNX Runtime, read through a stand-in for its API: per
    registration its name, provider, input and output types, characteristics and memory types, and
    the attributes (with their types) its kernel asks for when created."""
    import ctypes
    import shutil

    copy = tmp_path / "probe.so"
    shutil.copy(library, copy)  # a load of its own: the sessions' copy keeps ONNX Runtime's API
    lib = ctypes.CDLL(str(copy))
    api = _FakeApi()
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    assert lib.RegisterCustomOps(None, ctypes.byref(api.base)) is None
    custom_op = _custom_op_struct()
    found = []
    for address in api.ops:
        op = ctypes.cast(address, ctypes.POINTER(custom_op)).contents
        n_in, n_out = op.GetInputTypeCount(address), op.GetOutputTypeCount(address)
        api.asked.clear()
        kernel = ctypes.c_void_p()
        assert op.CreateKernelV2(address, ctypes.addressof(api.table), None, ctypes.byref(kernel)) is None
        op.KernelDestroy(kernel)
        found.append(
            (
                op.GetName(address).decode(),
                op.GetExecutionProviderType(address).decode(),
                tuple(op.GetInputType(address, i) for i in range(n_in)),
                tuple(op.GetOutputType(address, i) for i in range(n_out)),
                tuple(op.GetInputCharacteristic(address, i) for i in range(n_in)),
                tuple(op.GetOutputCharacteristic(address, i) for i in range(n_out)),
                tuple(op.GetInputMemoryType(address, i) for i in range(n_in)),
                tuple(api.asked),
            )
        )
    return found


def test_library_registers_the_op_table(library: Path, tmp_path: Path) -> None:
    """Every op of passes/ort_op_table.py, as the built library registers it (its C++ reads the
    generated llm2trt_ops.h): for both providers and both element types, the table's inputs and
    outputs with their types, optional outputs, host inputs and typed attributes, and no other op."""
    from llm2trt.passes import ort_op_table as table

    codes = {"I32": 6, "I64": 7, "F32": 1, "U8": 2, "I8": 3}  # ONNX's element types; "T" is the registration's own
    want = []
    for op in table.ALL:
        for element in (10, 1, 16) if op.bfloat16 else (10, 1):  # float16, float (, bfloat16)
            for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
                want.append(
                    (
                        op.name,
                        provider,
                        tuple(codes.get(op.input_type(n), element) for n in op.inputs),
                        tuple(codes.get(op.output_type(n), element) for n in op.outputs),
                        (0,) * len(op.inputs),  # required
                        tuple(int(n in op.optional_outputs) for n in op.outputs),
                        tuple(-2 if n in op.host_inputs else 0 for n in op.inputs),  # CPU memory: -2
                        tuple((a, table.ATTRIBUTE_TYPES[a].__name__) for a in op.attributes),
                    )
                )
    assert sorted(_registrations(library, tmp_path)) == sorted(want)


def test_library_build_follows_the_op_table(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build compiles the header generated from the table (kept beside the library), and a
    changed table is a different build."""
    import dataclasses

    from llm2trt.passes import ort_op_table as table

    header = ort_kernels.ops_header()
    assert (library.parent / ort_kernels.HEADER).read_text() == header
    assert not (ort_kernels.SOURCES / ort_kernels.HEADER).exists()  # it would shadow the generated one
    for op in table.ALL:
        assert f'{{"{op.name}", {len(op.inputs)}, {len(op.outputs)}, {len(op.attributes)},' in header
    key = ort_kernels.build_key(header, "nvcc", "sm_80", ())
    renamed = dataclasses.replace(table.ATTENTION, name="GroupQueryAttention2")
    monkeypatch.setattr(table, "ALL", (*table.OPS.values(), renamed))
    assert ort_kernels.ops_header() != header
    assert ort_kernels.build_key(ort_kernels.ops_header(), "nvcc", "sm_80", ()) != key


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_every_op_of_the_table_runs_without_its_body(library: Path, dtype: Any) -> None:
    """Each op with its local function removed: ONNX Runtime finds the library's op (both element
    types), and its outputs have the table's types."""
    from llm2trt.passes import ort_op_table as table

    models = {name: _one_op(name, 3, 64, 24, dtype) for name in table.OPS}
    shape = (4, 2, 16, 12)
    models[table.ATTENTION.name] = (
        attention_model(*shape, dtype),
        attention_values([5, 3], 5, 5, shape, dtype, seed=1),
    )
    models[table.ATTENTION_QK_NORM.name] = (
        attention_model(*shape, dtype, qk_norm=True),
        attention_values([5, 3], 5, 5, shape, dtype, seed=1, qk_norm=True),
    )
    for qk_norm in (False, True):  # the INT8-cache twins: int8 caches, float32 scales
        float_op = table.ATTENTION_QK_NORM if qk_norm else table.ATTENTION
        models[table.INT8_CACHE[float_op.name].name] = (
            attention_model(*shape, dtype, qk_norm=qk_norm, int8_cache=True),
            int8_cache_values(attention_values([5, 3], 5, 5, shape, dtype, seed=1, qk_norm=qk_norm)),
        )
    models[table.MOE.name] = _moe_case(np.random.default_rng(3), 5, 16, 8, 4, 2, 0, dtype)
    assert sorted(models) == sorted(op.name for op in table.ALL)
    fixed = {"F32": np.float32, "I8": np.int8}
    for name, (model, feeds) in models.items():
        del model.functions[:]
        outputs = _session(model, library).run(None, feeds)
        op = next(op for op in table.ALL if op.name == name)
        for output, value in zip(op.outputs, outputs, strict=True):
            assert value.dtype == fixed.get(op.output_type(output), dtype), (name, output)


def test_library_compiles_every_unit_in_csrc() -> None:
    """A .cu file added to plugins/csrc is compiled only once ort_library.UNITS names it."""
    assert sorted(p.name for p in ort_kernels.SOURCES.glob("*.cu")) == sorted(ort_kernels.UNITS)


# ---- NBits (weight-only INT4 / INT8) --------------------------------------------------------------

NBITS_OPS = sorted(name for name, op in OPS.items() if "Scales" in op.inputs)


@pytest.mark.parametrize("name", NBITS_OPS)
@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128)])
def test_library_nbits_ops_match_their_bodies(library: Path, name: str, bits: int, block: int) -> None:
    """Each NBits op (K 128: block 128 is one block a row, INT8's per-channel form), rows 1 and 3,
    float32 and float16: the library's CPU registration against the body ONNX Runtime runs and
    against float64 (the dequantized weight, the norm and SwiGLU in float64)."""
    for dtype in (np.float32, np.float16):
        for rows in (1, 3):
            feeds = sample_values(name, rows, 128, 40, dtype, seed=rows + bits, bits=bits, block=block)
            model = one_op_model(name, feeds)
            assert {a.name: a.i for a in model.graph.node[0].attribute if a.name != "epsilon"} == {
                "bits": bits,
                "block_size": block,
            }
            got = _session(model, library).run(None, feeds)
            want = _session(model, None).run(None, feeds)
            exact = reference(name, feeds)
            scale = float(np.abs(exact).max())
            # float32: both in float throughout; float16: the body rounds W, Normed and GateUp to
            # float16, the library only the Sum (and Y).
            bound = 1e-5 if dtype == np.float32 else 3e-3
            for y in (got[0], want[0]):
                assert np.abs(y.astype(np.float64) - exact).max() / scale < bound, (dtype, rows)
            assert np.abs(got[0].astype(np.float64) - want[0]).max() / scale < 2 * bound, (dtype, rows)
            if "Skip" in feeds:
                assert np.array_equal(got[1], want[1])  # Sum: X + Skip rounded to T, in both
            if rows > 1 and "Gamma" in feeds:  # Normed, staged for the many-row path
                normed = got[2 if "Skip" in feeds else 1]
                assert np.abs(normed - want[2 if "Skip" in feeds else 1]).max() < bound * 10


def test_library_nbits_symmetric_weight_is_the_signed_one(library: Path) -> None:
    """Zero points 8 (INT4) and 128 (INT8): the weight is (signed code) * scale, as an export with
    symmetric quantization writes it; checked against a float matmul of those signed codes."""
    from llm2trt.passes.ort_op_table import NBITS_ZERO
    from llm2trt.passes.ort_ops import pack_nbits

    rng = np.random.default_rng(5)
    for bits in (4, 8):
        zero = NBITS_ZERO[bits]
        signed = rng.integers(-zero, zero, (24, 64))
        scales = rng.uniform(0.01, 0.02, (24, 2)).astype(np.float32)
        feeds = {
            "X": rng.standard_normal((1, 2, 64)).astype(np.float32),
            "W": pack_nbits((signed + zero).astype(np.uint8), bits),
            "Scales": scales,
            "ZeroPoints": np.full((24, 2), zero, np.uint8),
        }
        got = _session(one_op_model("LinearNBits", feeds), library).run(None, feeds)[0]
        weight = signed.reshape(24, 2, 32) * scales[..., None].astype(np.float64)
        want = feeds["X"].astype(np.float64) @ weight.reshape(24, 64).T
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max(), bits


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Scales": lambda v: v[:, :1]}, r"llm2trt NBits: Scales must be \[N, K / block_size\] of X's type"),
        ({"ZeroPoints": lambda v: v[:-1]}, r"llm2trt NBits: ZeroPoints must be uint8 \[N, K / block_size\]"),
        ({"W": lambda v: v[:, :-1]}, r"llm2trt NBits: W must be uint8 \[N, K \* bits / 8\]"),
        ({"X": lambda v: v[..., :48]}, r"llm2trt NBits: block_size must divide K"),
    ],
)
def test_library_nbits_refuses_inconsistent_shapes(library: Path, change: dict[str, Any], message: str) -> None:
    """A wrong shape is one error line naming the tensor (the model is built from the right shapes,
    then fed the wrong one: ONNX Runtime leaves the custom op's inputs unchecked)."""
    feeds = sample_values("SkipRMSNormLinearNBits", 2, 64, 24, np.float32)
    model = one_op_model("SkipRMSNormLinearNBits", feeds)
    for graph_input in model.graph.input:  # any shape at run time
        graph_input.type.tensor_type.ClearField("shape")
    del model.functions[:]
    [(name, cut)] = change.items()
    feeds[name] = np.ascontiguousarray(cut(feeds[name]))
    if name == "X":
        feeds["Skip"] = np.ascontiguousarray(feeds["Skip"][..., :48])
        feeds["Gamma"] = np.ascontiguousarray(feeds["Gamma"][:48])
    with pytest.raises(Exception, match=message):
        _session(model, library).run(None, feeds)


def test_library_nbits_refuses_other_widths(library: Path) -> None:
    feeds = sample_values("LinearNBits", 1, 64, 8, np.float32)
    model = one_op_model("LinearNBits", feeds)
    del model.functions[:]
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "bits":
            attribute.i = 3
    with pytest.raises(Exception, match="llm2trt NBits: bits must be 4 or 8"):
        _session(model, library)


def test_header_lists_the_nbits_ops_with_uint8_codes() -> None:
    """The generated header's NBits rows: W and ZeroPoints uint8, Scales T, bits and block_size
    attributes, the nbits family flag set (and unset elsewhere)."""
    header = ort_kernels.ops_header()
    start = header.index('{"SkipRMSNormSwiGLUNBits", 6, 4, 3,')
    row = header[start : header.index("},", header.index("/* norm, skip", start))]
    assert "/* input_type */ {kT, kT, kT, kUInt8, kT, kUInt8}" in row
    assert "/* attribute */ {attr::epsilon, attr::bits, attr::block_size}" in row
    assert "/* norm, skip, swiglu, attention, qk_norm, float_y, moe, nbits, bfloat */" in row
    assert row.rstrip().endswith("true, true, true, false, false, false, false, true, false")
    plain = header[header.index('{"SkipRMSNormSwiGLU", 4, 4, 1,') :]
    plain = plain[: plain.index("},", plain.index("/* norm, skip"))]
    assert plain.rstrip().endswith("true, true, true, false, false, false, false, false, false")


# ---- MoE (routed experts) ------------------------------------------------------------------------


def _moe_model(dtype: Any, first_expert: int, cast_from: Any = None) -> onnx.ModelProto:
    """One llm2trt.MoE node over graph inputs, its body (passes/moe.py) attached. `cast_from`: the
    float inputs arrive in that type and are cast to `dtype` (bfloat16, which NumPy lacks) and Y
    back to it."""
    from onnx import TensorProto, helper

    from llm2trt.passes.moe import moe_function_proto
    from llm2trt.passes.ort_op_table import DOMAIN, MOE, VERSION

    elem = TensorProto.BFLOAT16 if dtype == "bfloat16" else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outer = elem if cast_from is None else helper.np_dtype_to_tensor_dtype(np.dtype(cast_from))
    floats = ("X", "GateUp", "Down")
    nodes = [helper.make_node("Cast", [f"{n}_in"], [n], to=elem) for n in floats if cast_from is not None]
    nodes.append(helper.make_node(MOE.name, list(MOE.inputs), ["Y"], domain=DOMAIN, first_expert=first_expert))
    if cast_from is not None:
        nodes.append(helper.make_node("Cast", ["Y"], ["Y_out"], to=outer))
    typed = {"ExpertIds": TensorProto.INT64, "ExpertWeights": TensorProto.FLOAT}
    inputs = [
        helper.make_tensor_value_info(n if n in typed or cast_from is None else f"{n}_in", typed.get(n, outer), None)
        for n in MOE.inputs
    ]
    y = "Y" if cast_from is None else "Y_out"
    graph = helper.make_graph(nodes, "moe", inputs, [helper.make_tensor_value_info(y, outer, None)])
    opset = 21
    model = helper.make_model(
        graph,
        functions=[moe_function_proto(opset)],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
    )
    model.ir_version = 10  # what ONNX Runtime 1.31+ reads
    return model


def _moe_values(
    rng: np.random.Generator, rows: int, hidden: int, inter: int, experts: int, k: int, first_expert: int, dtype: Any
) -> dict[str, np.ndarray]:
    """Random inputs whose routing has ties (rows with equal weights), a repeated expert in one row,
    and ids outside [first_expert, first_expert + experts) (experts held by another rank)."""
    spread = experts + 2 * max(first_expert, 1)  # ids from 0: some below the block, some above
    ids = np.stack([rng.permutation(spread)[:k] for _ in range(rows)]).astype(np.int64)
    weights = rng.random((rows, k)).astype(np.float32)
    weights[::2] = 1.0 / k  # ties
    if rows > 1 and k > 1:
        ids[1, 1] = ids[1, 0] = first_expert  # the same expert twice in one row: its weights add up
    return {
        "X": rng.standard_normal((rows, hidden)).astype(dtype),
        "ExpertIds": ids,
        "ExpertWeights": weights,
        "GateUp": (rng.standard_normal((experts, 2 * inter, hidden)) / np.sqrt(hidden)).astype(dtype),
        "Down": (rng.standard_normal((experts, hidden, inter)) / np.sqrt(inter)).astype(dtype),
    }


def _moe_case(
    rng: np.random.Generator, rows: int, hidden: int, inter: int, experts: int, k: int, first_expert: int, dtype: Any
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    return _moe_model(dtype, first_expert), _moe_values(rng, rows, hidden, inter, experts, k, first_expert, dtype)


def _moe_reference(feeds: dict[str, np.ndarray], first_expert: int) -> np.ndarray:
    """The op in float64: each row's routed experts only."""
    x, ids, w = (feeds[n].astype(np.float64) for n in ("X", "ExpertIds", "ExpertWeights"))
    gate_up, down = feeds["GateUp"].astype(np.float64), feeds["Down"].astype(np.float64)
    experts, inter = down.shape[0], down.shape[2]
    y = np.zeros_like(x)
    for n, j in np.ndindex(*ids.shape):
        e = int(ids[n, j]) - first_expert
        if 0 <= e < experts:
            g, u = gate_up[e, :inter] @ x[n], gate_up[e, inter:] @ x[n]
            y[n] += w[n, j] * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return y


@pytest.mark.parametrize(
    ("rows", "experts", "k", "first_expert"),
    [(7, 6, 3, 2), (1, 8, 2, 0), (4, 4, 1, 5), (9, 16, 8, 3)],
)
def test_library_moe_matches_its_body(library: Path, rows: int, experts: int, k: int, first_expert: int) -> None:
    """MoE through the library's CPU registration and through its body (dense over every expert):
    fp32 to 1e-5 of the largest output, both against float64; ties, a repeated expert and ids of
    other ranks' experts included."""
    model, feeds = _moe_case(np.random.default_rng(rows), rows, 32, 24, experts, k, first_expert, np.float32)
    [got] = _session(model, library).run(None, feeds)
    [want] = _session(model, None).run(None, feeds)
    exact = _moe_reference(feeds, first_expert)
    scale = float(np.abs(exact).max())
    assert got.shape == want.shape == (rows, 32) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(got - exact).max() <= 1e-5 * scale
    assert np.abs(want - exact).max() <= 1e-5 * scale  # the body is the reference, and it ran
    held = (feeds["ExpertIds"] >= first_expert) & (feeds["ExpertIds"] < first_expert + experts)
    assert np.array_equal(got[~held.any(axis=1)], np.zeros_like(got[~held.any(axis=1)]))  # nothing routed here


def test_library_moe_in_half_precisions(library: Path) -> None:
    """float16 (against the body, which rounds where the CPU registration does) and bfloat16 (cast
    in and out of the node: NumPy has no bfloat16, ONNX Runtime's CPU no bfloat16 MatMul for the
    body), both against float64."""
    rng = np.random.default_rng(5)
    feeds = _moe_values(rng, 6, 64, 32, 8, 2, 1, np.float16)
    model = _moe_model(np.float16, 1)
    [got] = _session(model, library).run(None, feeds)
    [want] = _session(model, None).run(None, feeds)
    exact = _moe_reference(feeds, 1)
    scale = float(np.abs(exact).max())
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float64) - want).max() <= 2e-3 * scale
    assert np.abs(got.astype(np.float64) - exact).max() <= 4e-3 * scale
    wide = {(f"{n}_in" if v.dtype == np.float16 else n): v.astype(np.float32) for n, v in feeds.items()}
    wide["ExpertIds"] = feeds["ExpertIds"]
    [got_bf16] = _session(_moe_model("bfloat16", 1, cast_from=np.float32), library).run(None, wide)
    assert np.abs(got_bf16 - exact).max() <= 3e-2 * scale


def test_library_moe_refuses_inconsistent_shapes(library: Path) -> None:
    model, feeds = _moe_case(np.random.default_rng(0), 3, 16, 8, 4, 2, 0, np.float32)
    del model.functions[:]  # the library's op alone: its own message
    feeds["Down"] = feeds["Down"][:, :, :4]
    with pytest.raises(Exception, match=r"llm2trt MoE: X must be \[N, H\], GateUp \[E, 2I, H\] and Down \[E, H, I\]"):
        _session(model, library).run(None, feeds)


def test_header_lists_moe_with_its_types() -> None:
    """The generated header's MoE row: int64 ids, float32 weights, T elsewhere; the MoE family and a
    bfloat16 registration."""
    header = ort_kernels.ops_header()
    start = header.index('{"MoE", 5, 1, 1,')
    row = header[start : header.index("},", header.index("/* norm, skip", start))]
    assert "/* input_type */ {kT, kInt64, kFloat32, kT, kT}" in row
    assert "/* output_type */ {kT}" in row and "/* attribute */ {attr::first_expert}" in row
    assert row.rstrip().endswith("false, false, false, false, false, false, true, false, true")
    assert "enum Type : int { kT, kInt32, kInt64, kFloat32, kUInt8, kInt8 };" in header


def test_moe_tensorrt_face_is_refused_cleanly_under_tensorrt_rtx() -> None:
    """plugins/moe_trt.py, in a process of its own (importing it registers the plugin): under
    TensorRT-RTX a graph's MoE nodes are reported inlined (their body built as layers), and asking
    the plugin to register anyway is one clear error, not an abort; its body is the op's function."""
    import json
    import subprocess
    import sys

    probe = """
import json
from llm2trt.backends.tensorrt.adapter import load_backend
from llm2trt.plugins import PluginRef
from llm2trt.plugins import moe_trt
backend = load_backend()
[status] = backend.load_plugins([PluginRef("MoE", "llm2trt.plugins.moe_trt")], {"MoE": 3})
try:
    moe_trt.register_tensorrt(backend.module)
    refused = ""
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
body = moe_trt.SPEC.function(21)
print(json.dumps({"rtx": backend.is_rtx, "status": status.status, "reason": status.reason, "nodes": status.nodes,
                  "refused": refused, "body": [body.domain, body.name, len(body.nodes)], "id": moe_trt.PLUGIN_ID}))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["id"] == "llm2trt::MoE" and found["body"][:2] == ["llm2trt", "MoE"] and found["body"][2] > 20
    if not found["rtx"]:  # full TensorRT: the plugin registers rather than being inlined
        assert found["refused"] == "" and found["status"] != "inlined", found
        return
    assert (found["status"], found["nodes"]) == ("inlined", 3) and "cannot host plugin layers" in found["reason"]
    assert found["refused"].startswith("BackendError: MoE's TensorRT plugin needs full TensorRT: TensorRT-RTX")
