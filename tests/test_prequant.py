"""Pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors) imported without dequantizing.

Each test writes a tiny Llama checkpoint whose linear layers hold known random 4-bit codes, zero
points and float16 scales, packed as the format specifies (compressed-tensors by its own library),
converts it, and checks the graph's DequantizeLinear constants against those numbers exactly, the
weights they dequantize to against the format's dequantization exactly, and ONNX Runtime's logits
against transformers running the dequantized weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper
from safetensors.torch import save_file

from llm2trt.convert.export import export_module
from llm2trt.core.artifact import load_onnx
from llm2trt.core.manifest import Manifest
from llm2trt.core.numerics import normwise_rel_err, run_ort
from llm2trt.exporters.llama import LlamaSpec
from llm2trt.passes.pattern import module_of
from llm2trt.passes.zero_points import tensorrt_form, zero_point_weights
from tests.conftest import CC, assert_clean_failure, run_cli, run_json

GROUP = 16
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays float
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column of each nibble, AutoAWQ's GEMM layout
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # layers reading one input


@dataclass
class Truth:
    """One layer's numbers as the test made them: codes [K, N] in group order, zeros and scales [K/G, N]."""

    u: np.ndarray
    z: np.ndarray
    s: np.ndarray  # float16
    perm: np.ndarray | None  # act-order: row i of u is input channel perm[i]

    def weight(self) -> np.ndarray:
        """(u - z) * s in float32, input channels in the model's order ([K, N])."""
        w = (self.u.astype(np.float32) - np.repeat(self.z, GROUP, 0)) * np.repeat(self.s.astype(np.float32), GROUP, 0)
        return by_channel(w, self.perm)


def by_channel(rows: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """Rows in group order (row i is input channel perm[i]) put back in channel order."""
    if perm is None:
        return rows
    out = np.empty_like(rows)
    out[perm] = rows
    return out


def tiny() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LlamaSpec.tiny_config)).eval()


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def truths(
    model: torch.nn.Module, sym: bool, act_order: bool = False, seed: int = 1, lowest_zero: int = 1
) -> dict[str, Truth]:
    """Random codes per layer; act-order layers reading one input share one order (as GPTQ's do).
    Zero points from `lowest_zero` (GPTQ v1 cannot store 0)."""
    rng = np.random.default_rng(seed)
    orders: dict[str, np.ndarray] = {}
    out = {}
    for name, module in linears(model).items():
        n, k = module.weight.shape
        u = rng.integers(0, 16, (k, n), dtype=np.uint8)
        z = (
            np.full((k // GROUP, n), 8, np.uint8)
            if sym
            else rng.integers(lowest_zero, 16, (k // GROUP, n), dtype=np.uint8)
        )
        s = (rng.random((k // GROUP, n)) * 0.05 + 0.002).astype(np.float16)
        parent, last = name.rsplit(".", 1)
        reader = parent + "." + SHARED_INPUT.get(last, last)
        perm = orders.setdefault(reader, rng.permutation(k)) if act_order else None
        out[name] = Truth(u, z, s, perm)
    return out


def float_model(model: torch.nn.Module, layers: dict[str, Truth]) -> transformers.LlamaForCausalLM:
    """The reference: the tiny model with each linear weight replaced by its dequantization."""
    ref = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, truth in layers.items():
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(truth.weight().T))
    ref.load_state_dict(state)
    return ref


def pack(codes: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """Eight 4-bit codes per int32 along `axis`, low nibble first, nibble p holding element order[p]."""
    moved = np.moveaxis(codes.astype(np.uint32), axis, -1)
    runs = moved.reshape(*moved.shape[:-1], -1, 8)
    words = np.zeros(runs.shape[:-1], np.uint32)
    for p in range(8):
        words |= runs[..., order[p]] << np.uint32(4 * p)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)


def save(directory: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], quant: dict[str, Any]) -> Path:
    directory.mkdir(parents=True)
    config: Any = model.config
    config.save_pretrained(str(directory))
    raw = json.loads((directory / "config.json").read_text())
    raw["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def float_state(model: torch.nn.Module, layers: dict[str, Truth]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers}


def write_gptq(
    directory: Path,
    model: torch.nn.Module,
    layers: dict[str, Truth],
    sym: bool,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """AutoGPTQ's layout: qweight [K/8, N] (along K), qzeros [K/G, N/8] holding z - 1 (v1, the
    default) or z (checkpoint_format gptq_v2), g_idx [K]."""
    v1 = int((overrides or {}).get("checkpoint_format", "gptq") == "gptq")
    state = float_state(model, layers)
    for name, t in layers.items():
        k = t.u.shape[0]
        rows, g_idx = t.u, (np.arange(k) // GROUP).astype(np.int32)
        if t.perm is not None:  # stored in channel order; g_idx names each channel's group
            rows = np.empty_like(t.u)
            rows[t.perm] = t.u
            g_idx[t.perm] = np.arange(k) // GROUP
        state[f"{name}.qweight"] = torch.from_numpy(pack(rows, 0))
        state[f"{name}.qzeros"] = torch.from_numpy(pack(t.z - v1, 1))
        state[f"{name}.scales"] = torch.from_numpy(t.s)
        state[f"{name}.g_idx"] = torch.from_numpy(g_idx)
    quant = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": sym, "checkpoint_format": "gptq"}
    return save(
        directory,
        model,
        state,
        {**quant, "desc_act": any(t.perm is not None for t in layers.values()), **(overrides or {})},
    )


def write_awq(directory: Path, model: torch.nn.Module, layers: dict[str, Truth]) -> Path:
    """AutoAWQ's GEMM layout: qweight [K, N/8] and qzeros [K/G, N/8] along N in AWQ's nibble order."""
    state = float_state(model, layers)
    for name, t in layers.items():
        state[f"{name}.qweight"] = torch.from_numpy(pack(t.u, 1, AWQ_ORDER))
        state[f"{name}.qzeros"] = torch.from_numpy(pack(t.z, 1, AWQ_ORDER))
        state[f"{name}.scales"] = torch.from_numpy(t.s)
    quant = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    return save(directory, model, state, quant)


def ct_scheme(sym: bool) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=GROUP)
    return QuantizationScheme(targets=["Linear"], weights=args)


def write_compressed(directory: Path, model: torch.nn.Module, layers: dict[str, Truth], sym: bool) -> Path:
    """compressed-tensors pack-quantized, packed by the library's own compressor from the float weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    scheme = ct_scheme(sym)
    state = float_state(model, layers)
    for name, t in layers.items():
        module = {
            "weight": torch.from_numpy(np.ascontiguousarray(t.weight().T)),
            "weight_scale": torch.from_numpy(np.ascontiguousarray(t.s.T)),  # [N, K/G]
            "weight_zero_point": torch.from_numpy(np.ascontiguousarray((t.z.astype(np.int8) - 8).T)),
        }
        for key, value in PackedQuantizationCompressor.compress(module, scheme).items():
            state[f"{name}.{key}"] = value
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    )
    return save(directory, model, state, config.model_dump())


# -- reading the artifact ------------------------------------------------------------------------


@dataclass
class Imported:
    codes: np.ndarray  # as stored (int4 or uint4)
    scales: np.ndarray
    zeros: np.ndarray | None
    perm: np.ndarray | None  # the Gather in front of the MatMul

    def weight(self) -> np.ndarray:
        q = self.codes.astype(np.float32) - (
            np.repeat(self.zeros, GROUP, 0).astype(np.float32) if self.zeros is not None else 0
        )
        return by_channel(q * np.repeat(self.scales.astype(np.float32), GROUP, 0), self.perm)


def imported(out: Path) -> dict[str, Imported]:
    """Each MatMul's weight DequantizeLinear, by module."""
    manifest = Manifest.read(out)
    proto = onnx.load(str(manifest.onnx_path(out)))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    found = {}
    for node in proto.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        assert dict((a.name, onnx.helper.get_attribute_value(a)) for a in dq.attribute) == {
            "axis": 0,
            "block_size": GROUP,
        }
        gather = producers.get(node.input[0])
        perm = inits[gather.input[1]] if gather is not None and gather.op_type == "Gather" else None
        zeros = inits[dq.input[2]] if len(dq.input) > 2 else None
        found[module_of(node.name)] = Imported(inits[dq.input[0]], inits[dq.input[1]], zeros, perm)
    return found


def logits_error(out: Path, reference: torch.nn.Module) -> float:
    manifest = Manifest.read(out)
    graph = manifest.graph()
    feeds = LlamaSpec().sample_inputs(reference.config, graph, batch=2, sequence=9, seed=3)
    got = run_ort(manifest.onnx_path(out), feeds)[graph.main_output]
    wrapper = export_module(reference, graph, dict(LlamaSpec.forward_kwargs))
    with torch.no_grad():
        want = wrapper(*[torch.from_numpy(feeds[t.name]) for t in graph.inputs])[0].numpy()
    return normwise_rel_err(got, want)


def convert(source: Path, out: Path) -> Manifest:
    result = run_cli("convert", source, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    return Manifest.read(out)


def check_import(
    out: Path, model: torch.nn.Module, layers: dict[str, Truth], method: str, sym: bool
) -> dict[str, Imported]:
    """The record, the constants and weights exactly, the logits within fp32 tolerance."""
    manifest = Manifest.read(out)
    quant = manifest.quantization
    assert quant is not None and quant.method == method and quant.group_size == GROUP
    assert sorted(quant.quantized) == sorted(layers) and list(quant.kept) == ["lm_head"]
    assert manifest.opset == 21
    assert manifest.graph().op_counts["DequantizeLinear"] == LINEARS
    graph = imported(out)
    assert sorted(graph) == sorted(layers)
    for name, truth in layers.items():
        got = graph[name]
        # Act-order: the same channels in each group (the order within a group is free), so the codes
        # are compared channel by channel.
        assert (got.perm is None) == (truth.perm is None), name
        want = by_channel(truth.u, truth.perm)
        if sym:  # INT4 codes u - 8, no zero point: TensorRT's form
            assert got.codes.dtype.name == "int4" and got.zeros is None
            assert np.array_equal(by_channel(got.codes.astype(np.int16) + 8, got.perm), want), name
        else:
            assert got.codes.dtype.name == "uint4" and got.zeros is not None and got.zeros.dtype.name == "uint4"
            assert np.array_equal(by_channel(got.codes.astype(np.uint8), got.perm), want), name
            assert np.array_equal(got.zeros.astype(np.uint8), truth.z), name
        assert got.scales.dtype == np.float32 and np.array_equal(got.scales, truth.s.astype(np.float32)), name
        assert np.array_equal(got.weight(), truth.weight()), name  # max abs diff 0
    assert logits_error(out, float_model(model, layers)) <= 1e-4
    return graph


# -- the formats ---------------------------------------------------------------------------------


def test_gptq_symmetric_is_int4_without_zero_points(tmp_path: Path) -> None:
    model = tiny()
    layers = truths(model, sym=True)
    source = write_gptq(tmp_path / "gptq", model, layers, sym=True)
    # AutoGPTQ's own place for the config: quantize_config.json beside a plain config.json.
    raw = json.loads((source / "config.json").read_text())
    legacy = {k: v for k, v in raw.pop("quantization_config").items() if k != "quant_method"}
    (source / "quantize_config.json").write_text(json.dumps(legacy))
    (source / "config.json").write_text(json.dumps(raw))
    convert(source, tmp_path / "out")
    check_import(tmp_path / "out", model, layers, "gptq-import", sym=True)
    # Already quantized: optimize --quant refuses it.
    result = run_cli("optimize", tmp_path / "out", "-o", tmp_path / "again", "--quant", "int4-rtn")
    assert_clean_failure(result, "already quantized (gptq-import)", tmp_path / "again")


def test_gptq_act_order_asymmetric_and_its_tensorrt_form(tmp_path: Path) -> None:
    model = tiny()
    layers = truths(model, sym=False, act_order=True)
    source = write_gptq(tmp_path / "gptq", model, layers, sym=False)
    manifest = convert(source, tmp_path / "out")
    check_import(tmp_path / "out", model, layers, "gptq-import", sym=False)
    # One Gather per input and order: q/k/v share theirs, gate/up theirs (4 a layer).
    plain = convert(write_gptq(tmp_path / "plain", model, truths(model, sym=False), sym=False), tmp_path / "plain-out")
    assert manifest.graph().op_counts["Gather"] - plain.graph().op_counts["Gather"] == 8
    assert manifest.graph().op_counts["MatMul"] == plain.graph().op_counts["MatMul"]

    # TensorRT's form: INT4 codes without zero points plus a float32 correction, same logits.
    out = tmp_path / "out"
    graph = manifest.graph()
    skeleton = load_onnx(manifest.onnx_path(out), with_weights=False)
    assert zero_point_weights(skeleton) == LINEARS
    rewritten = tensorrt_form(skeleton, out, tmp_path / "trt-form")
    proto = onnx.load(str(rewritten), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == LINEARS and all(
        len(n.input) == 2 for n in proto.graph.node if n.op_type == "DequantizeLinear"
    )
    # a correction MatMul and Add per layer, a block-sum MatMul per distinct input (4 a layer)
    assert ops.count("MatMul") == graph.op_counts["MatMul"] + LINEARS + 8
    feeds = LlamaSpec().sample_inputs(model.config, graph, batch=2, sequence=9, seed=5)
    want = run_ort(manifest.onnx_path(out), feeds)[graph.main_output]
    got = run_ort(rewritten, feeds)[graph.main_output]
    assert normwise_rel_err(got, want) <= 1e-5

    # TensorRT-RTX builds it (the rewrite runs inside build): every imported layer an INT4 GEMM.
    code, info = run_json("build", out, "-o", tmp_path / "engine", *CC, "-q")
    assert code == 0, info
    assert info["matmul_precisions"].get("fp32 x int4") == LINEARS and info["unfused_qdq"] == []


def test_gptq_v2_stores_its_zero_points_as_they_are(tmp_path: Path) -> None:
    model = tiny()
    layers = truths(model, sym=False, seed=4, lowest_zero=0)
    source = write_gptq(tmp_path / "gptq", model, layers, sym=False, overrides={"checkpoint_format": "gptq_v2"})
    convert(source, tmp_path / "out")
    graph = check_import(tmp_path / "out", model, layers, "gptq-import", sym=False)
    assert min(int(g.zeros.astype(np.uint8).min()) for g in graph.values() if g.zeros is not None) == 0


def test_awq_gemm_and_optimize_after_import(tmp_path: Path) -> None:
    model = tiny()
    layers = truths(model, sym=False, seed=2)
    source = write_awq(tmp_path / "awq", model, layers)
    convert(source, tmp_path / "out")
    check_import(tmp_path / "out", model, layers, "awq-import", sym=False)
    # optimize fuses around the imported weights (the DequantizeLinears stay) and checks numerically.
    for args in ((), ("--kv-form", "gqa")):
        code, report = run_json("optimize", tmp_path / "out", "-o", tmp_path / f"opt{len(args)}", *args, "-q")
        assert code == 0, report
        assert report["fusions"]["Attention"] == 2 and report["numeric_check"]["passed"], report
        optimized = Manifest.read(tmp_path / f"opt{len(args)}")
        assert optimized.quantization == Manifest.read(tmp_path / "out").quantization
        if not args:  # (the gqa form's ONNX Runtime kernels read the codes in ops of their own)
            assert optimized.graph().op_counts["DequantizeLinear"] == LINEARS


@pytest.mark.parametrize("sym", [True, False], ids=["symmetric", "asymmetric"])
def test_compressed_tensors_pack_quantized(sym: bool, tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file

    model = tiny()
    layers = truths(model, sym=sym, seed=3)
    source = write_compressed(tmp_path / "ct", model, layers, sym)
    convert(source, tmp_path / "out")
    graph = check_import(tmp_path / "out", model, layers, "compressed-tensors-import", sym=sym)
    # The library's own decompression of the checkpoint (scales in float32: exact) is the graph's.
    stored = load_file(str(source / "model.safetensors"))
    for name in layers:
        module = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == name}
        module["weight_scale"] = module["weight_scale"].float()
        weight = PackedQuantizationCompressor.decompress(module, ct_scheme(sym))["weight"]
        assert np.array_equal(weight.numpy().T, graph[name].weight()), name


# -- refusals ------------------------------------------------------------------------------------


W4A8 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
    }
}


def _gptq_with(tmp_path: Path, **extra: Any) -> Path:
    model = tiny()
    return write_gptq(tmp_path / "src", model, truths(model, sym=False), sym=False, overrides=extra)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"bits": 8}, "GPTQ checkpoint with 8-bit weights is not supported"),
        ({"bits": 3}, "GPTQ checkpoint with 3-bit weights is not supported"),
        ({"group_size": -1}, "group_size -1 is not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"quant_method": "bitsandbytes"}, "quantized with 'bitsandbytes', which llm2trt does not import"),
        ({"sym": True}, "model.layers.0.mlp.down_proj: the checkpoint says sym, but its zero points are not all 8"),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": W4A8},
            "config group 'group_0' quantizes activations (weight-only W4A16 is imported)",
        ),
    ],
)
def test_unsupported_schemes_are_one_line(change: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    source = _gptq_with(tmp_path, **change)
    result = run_cli("convert", source, "-o", tmp_path / "out")
    assert_clean_failure(result, fragment, tmp_path / "out")


@pytest.mark.parametrize(
    ("tensor", "damage", "fragment"),
    [
        ("qzeros", "drop", "model.layers.0.mlp.down_proj has qweight but no qzeros"),
        ("scales", "truncate", "mismatched shape: model.layers.0.mlp.down_proj.scales is [7, 64]"),
        ("g_idx", "unbalance", "down_proj: its g_idx does not give every group exactly 16 input channels"),
        ("qzeros", "zero 16", "down_proj.qzeros stores 15: a zero point of 16 under gptq's zero-minus-one"),
    ],
)
def test_broken_checkpoints_are_one_line(tensor: str, damage: str, fragment: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = _gptq_with(tmp_path)
    state = load_file(str(source / "model.safetensors"))
    key = f"model.layers.0.mlp.down_proj.{tensor}"
    if damage == "drop":
        del state[key]
    elif damage == "truncate":
        state[key] = state[key][:-1].clone()
    elif damage == "unbalance":  # channel 0 moved from group 0 to group 1: 15 and 17 channels
        state[key][0] = 1
    else:  # the first zero point's nibble set to 15: z = 16 under v1
        state[key][0, 0] |= 0xF
    save_file(state, str(source / "model.safetensors"))
    result = run_cli("convert", source, "-o", tmp_path / "out")
    assert_clean_failure(result, fragment, tmp_path / "out")
