"""Pre-quantized checkpoints imported as they are: GPTQ, AWQ (GEMM) and compressed-tensors
(pack-quantized), 4-bit, in groups of input channels.

Each format is one `Format` below: the names of its tensors, how their 4-bit codes sit in int32 words
(`Packing`: the axis packed and the order of the eight nibbles) and its zero-point convention. Every
layer is brought to one form, `Layer`: unsigned codes [K, N], scales and zero points [K/G, N] and,
for act-order checkpoints, the permutation that sorts the input channels into whole groups.

Convert traces the float model whose linear weights are (codes - zeros) * scales (the checkpoint's
own dequantization, exact in float32), then `ImportQuantized` replaces each such weight in the graph
with DequantizeLinear(codes, scales[, zeros]) (axis 0, block_size G, opset 21): symmetric layers as
INT4 codes (u - 8) without a zero point, the form TensorRT fuses; asymmetric ones as UINT4 codes with
UINT4 zero points (exact; `llm2trt.passes.zero_points` gives TensorRT an equal form at build).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.dtypes import DType
from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.log import plural
from llm2trt.core.manifest import PassRecord
from llm2trt.core.quant import Quantization
from llm2trt.passes.manager import GraphPass, Model, PassManager, PassResult, read_values
from llm2trt.passes.opset import OpsetUpgrade
from llm2trt.passes.pattern import module_of
from llm2trt.passes.qdq import is_linear, reads_tied_weight

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BITS = 4
PER_WORD = 32 // BITS
MIDPOINT = 1 << (BITS - 1)  # the zero of a symmetric unsigned 4-bit code
IMPORT_OPSET = 21  # DequantizeLinear's block_size and 4-bit types
PLAIN_ORDER = tuple(range(PER_WORD))
# AutoAWQ's GEMM kernels read nibble p of a word as column AWQ_ORDER[p] of its run of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class Packing:
    """Eight 4-bit codes per int32 word along `axis` of the stored tensor, low nibble first; nibble
    p holds element `order[p]` of its run of eight."""

    axis: int
    order: tuple[int, ...] = PLAIN_ORDER


def unpack(words: np.ndarray, packing: Packing) -> np.ndarray:
    """The unsigned codes (uint8, 0..15) of an int32 tensor packed as `packing` says."""
    moved = np.moveaxis(np.ascontiguousarray(words, dtype=np.int32).view(np.uint32), packing.axis, -1)
    shifts = np.arange(PER_WORD, dtype=np.uint32) * BITS
    nibbles = ((moved[..., None] >> shifts) & 0xF).astype(np.uint8)  # [..., words, nibble]
    codes = np.empty_like(nibbles)
    codes[..., list(packing.order)] = nibbles
    return np.moveaxis(codes.reshape(*moved.shape[:-1], -1), -1, packing.axis)


def signed(codes: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit codes around MIDPOINT as INT4 (u - 8)."""
    out: np.ndarray = (codes.astype(np.int8) - MIDPOINT).astype(DType.INT4.numpy)
    return out


@dataclass(frozen=True)
class Format:
    """One checkpoint layout: a quantized module `m` holds `m.<weight>`, `m.<scales>` and, unless
    symmetric without them, `m.<zeros>` (and `m.<g_idx>` where the format has one)."""

    name: str
    weight: str
    scales: str
    zeros: str
    g_idx: str | None
    codes: Packing
    zero_codes: Packing
    out_first: bool  # stored [N, ...] (nn.Linear's orientation) rather than [K, ...]
    zero_offset: int = 0  # added to a stored zero point (GPTQ v1 stores z - 1)
    extra: tuple[str, ...] = ()  # other per-module tensors the format writes (read, not needed)


GPTQ = Format("gptq", "qweight", "scales", "qzeros", "g_idx", Packing(0), Packing(1), False, zero_offset=1)
GPTQ_V2 = Format("gptq_v2", "qweight", "scales", "qzeros", "g_idx", Packing(0), Packing(1), False)
AWQ = Format("awq", "qweight", "scales", "qzeros", None, Packing(1, AWQ_ORDER), Packing(1, AWQ_ORDER), False)
# compressed-tensors stores signed codes and zero points offset by 8 (unsigned nibbles): their
# difference, all dequantization needs, is the same unsigned.
COMPRESSED = Format(
    "compressed-tensors",
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
    Packing(1),
    Packing(0),
    True,
    extra=("weight_shape",),
)


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint's quantization_config declares, checked."""

    format: Format
    group_size: int
    symmetric: bool
    act_order: bool  # declared; the g_idx tensors decide per layer

    @property
    def method(self) -> str:
        return f"{self.format.name.split('_')[0]}-import"

    def describe(self) -> str:
        grid = "symmetric (int4)" if self.symmetric else "asymmetric (uint4 zero points)"
        order = ", act-order" if self.act_order else ""
        return f"the checkpoint ({self.format.name}, groups of {self.group_size}, {grid}{order})"


@dataclass
class Layer:
    """One quantized linear layer in the common form."""

    module: str
    codes: np.ndarray  # uint8 [K, N], 0..15, input channels in group order
    scales: np.ndarray  # [K/G, N], the checkpoint's float dtype
    zeros: np.ndarray | None  # uint8 [K/G, N]; None: symmetric (every zero is MIDPOINT)
    perm: np.ndarray | None  # int64 [K]: row i of `codes` is input channel perm[i] (act-order)
    group: int

    def weight(self) -> np.ndarray:
        """The dequantized weight [K, N] in float32, input channels in the model's order:
        (codes - zeros) * scales, exact (a 5-bit integer times a float16/bfloat16 scale fits float32)."""
        zeros = self.zeros.astype(np.float32) if self.zeros is not None else np.float32(MIDPOINT)
        per_group = np.repeat(self.scales.astype(np.float32), self.group, axis=0)
        zeros = np.repeat(zeros, self.group, axis=0) if self.zeros is not None else zeros
        w = (self.codes.astype(np.float32) - zeros) * per_group
        if self.perm is None:
            return w
        out = np.empty_like(w)
        out[self.perm] = w
        return out


def _flag(config: dict[str, Any], key: str, what: str) -> bool:
    value = config.get(key)
    if not isinstance(value, bool):
        raise InputError(f"{what}: quantization_config.{key} is {value!r}, expected true or false")
    return value


def _four_bits(bits: Any, what: str) -> None:
    if bits != BITS:
        # !r: a config's string is quoted, its control characters escaped (one line, whatever it holds)
        raise InputError(f"{what} with {bits!r}-bit weights is not supported: llm2trt imports 4-bit checkpoints only")


def _group(size: Any, what: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size & (size - 1):
        raise InputError(
            f"{what} with group_size {size!r} is not supported: groups must be a power of two >= 16 "
            "(per-channel 4-bit, group_size -1, is not imported)"
        )
    return size


def _gptq(config: dict[str, Any]) -> Scheme:
    what = "GPTQ checkpoint"
    _four_bits(config.get("bits"), what)
    form = config.get("checkpoint_format", config.get("format", "gptq"))
    formats = {"gptq": GPTQ, "gptq_v2": GPTQ_V2}
    if not isinstance(form, str) or form not in formats:  # (a list is unhashable: `in` would raise)
        raise InputError(f"{what} in checkpoint_format {form!r} is not supported (gptq or gptq_v2 only)")
    if config.get("dynamic"):
        raise InputError(f"{what} with per-module overrides (quantization_config.dynamic) is not supported")
    if config.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise InputError(f"{what} packed in {config['pack_dtype']!r} is not supported (int32 words only)")
    sym = _flag(config, "sym", what)
    act_order = bool(config.get("desc_act", False))
    return Scheme(formats[form], _group(config.get("group_size"), what), sym, act_order)


def _awq(config: dict[str, Any]) -> Scheme:
    what = "AWQ checkpoint"
    _four_bits(config.get("bits", config.get("w_bit")), what)
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise InputError(f"{what} in version {version!r} is not supported (AutoAWQ's GEMM layout only)")
    if not config.get("zero_point", True):
        raise InputError(f"{what} without zero points (zero_point false) is not supported")
    return Scheme(AWQ, _group(config.get("group_size", config.get("q_group_size")), what), False, False)


def _group_weights(name: str, group: Any, config: dict[str, Any], what: str) -> tuple[int, bool, str]:
    """One config group's weight scheme (group size, symmetric, act-order), or one line saying why not."""
    if not isinstance(group, dict) or not isinstance(group.get("weights") or {}, dict):
        raise InputError(f"{what}: config group {name!r} is not an object with a weights object")
    form = group.get("format") or config.get("format")
    if form != "pack-quantized":
        raise InputError(f"{what}: config group {name!r} is in format {form!r} (pack-quantized only)")
    if group.get("input_activations") or group.get("output_activations"):
        raise InputError(f"{what}: config group {name!r} quantizes activations (weight-only W4A16 is imported)")
    args = group.get("weights") or {}
    _four_bits(args.get("num_bits"), what)
    if args.get("type", "int") != "int" or args.get("strategy") != "group" or args.get("dynamic"):
        raise InputError(
            f"{what}: config group {name!r} is {args.get('type')!r} {args.get('strategy')!r} "
            "(static int weights in groups only)"
        )
    order = args.get("actorder")  # "group", "weight", None: compared as text (a list would be unhashable)
    return _group(args.get("group_size"), what), bool(args.get("symmetric", True)), str(order)


def _compressed(config: dict[str, Any]) -> Scheme:
    what = "compressed-tensors checkpoint"
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{what}: quantization_config has no config_groups")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise InputError(f"{what} in status {status!r} holds no packed weights (quantization_status 'compressed' only)")
    for key in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if config.get(key):
            raise InputError(f"{what} with {key} is not supported")
    weights = [_group_weights(str(name), group, config, what) for name, group in groups.items()]
    if len(set(weights)) != 1:
        raise InputError(f"{what} with config groups of different weight schemes is not supported")
    size, sym, actorder = weights[0]
    return Scheme(COMPRESSED, size, sym, actorder == "group")


_READERS: dict[str, Callable[[dict[str, Any]], Scheme]] = {
    "gptq": _gptq,
    "awq": _awq,
    "compressed-tensors": _compressed,
}


# Where older writers put the config instead of config.json's quantization_config: AutoGPTQ's
# quantize_config.json and AutoAWQ's quant_config.json, whose method is implied by the file.
LEGACY_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def find_config(path: Path, raw: dict[str, Any]) -> tuple[Any, Path] | None:
    """A checkpoint directory's quantization config and the file it came from, or None (float)."""
    if raw.get("quantization_config") is not None:
        return raw["quantization_config"], path / "config.json"
    for name, method in LEGACY_CONFIGS.items():
        if (path / name).is_file():
            try:
                config = json.loads((path / name).read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read {path / name}: {exc}") from None
            if isinstance(config, dict) and not config.get("quant_method"):
                config["quant_method"] = method
            return config, path / name
    return None


def read_scheme(config: Any, where: Path) -> Scheme:
    """The scheme of a config.json `quantization_config`, or one line saying why it is refused."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: quantization_config is not an object")
    method = str(config.get("quant_method", "")).lower()
    reader = _READERS.get(method)
    if reader is None:
        raise InputError(
            f"{where} is quantized with {method or 'an unnamed method'!r}, which llm2trt does not import "
            f"(it imports {', '.join(_READERS)})"
        )
    return reader(config)


# -- the checkpoint ------------------------------------------------------------------------------


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: a pre-quantized checkpoint is read from safetensors files, and there are none")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (OSError, SafetensorError) as exc:
            raise InputError(f"cannot read {file}: {exc}") from None
    return tensors


def _numpy(tensor: torch.Tensor) -> np.ndarray:

    if DType.find(tensor.dtype) is DType.BF16:  # numpy has no bfloat16: float32 holds it exactly
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _shape(what: str, array: np.ndarray, want: tuple[int, ...]) -> None:
    if tuple(array.shape) != want:
        raise InputError(f"mismatched shape: {what} is {list(array.shape)}, expected {list(want)}")


def read_layers(path: Path, scheme: Scheme) -> tuple[list[Layer], dict[str, torch.Tensor]]:
    """The checkpoint's quantized layers in the common form, and its other tensors (as stored)."""
    tensors = _checkpoint(path)
    fmt = scheme.format
    suffix = "." + fmt.weight
    modules = sorted(name[: -len(suffix)] for name in tensors if name.endswith(suffix))
    if not modules:
        raise InputError(f"{path}: its quantization_config says {fmt.name}, but no tensor is named *{suffix}")
    layers = [_layer(module, tensors, scheme) for module in modules]
    owned = {f"{m}.{n}" for m in modules for n in (fmt.weight, fmt.scales, fmt.zeros, fmt.g_idx, *fmt.extra) if n}
    rest = {name: t for name, t in tensors.items() if name not in owned}
    return layers, rest


def _layer(module: str, tensors: dict[str, torch.Tensor], scheme: Scheme) -> Layer:
    fmt, size = scheme.format, scheme.group_size

    def get(name: str | None) -> np.ndarray | None:
        key = f"{module}.{name}"
        return _numpy(tensors[key]) if name is not None and key in tensors else None

    def need(name: str) -> np.ndarray:
        found = get(name)
        if found is None:
            raise InputError(f"{module} has {fmt.weight} but no {name} (the checkpoint is incomplete)")
        return found

    words, scales = need(fmt.weight), need(fmt.scales)
    if words.dtype != np.int32:
        raise InputError(f"{module}.{fmt.weight} is {words.dtype}, expected int32 words")
    codes = unpack(words, fmt.codes)
    if fmt.out_first:
        codes, scales = codes.T, scales.T
    k, n = codes.shape
    if k % size:
        raise InputError(f"{module}: {k} input channels are not a multiple of the group size {size}")
    _shape(f"{module}.{fmt.scales}", scales, (k // size, n))
    stored = get(fmt.zeros) if scheme.symmetric else need(fmt.zeros or "zero points")
    zeros = _zeros(module, stored, scheme, (k // size, n))
    perm = _permutation(module, get(fmt.g_idx), k, size)
    if perm is not None:
        codes = codes[perm]
    shape = get("weight_shape") if "weight_shape" in fmt.extra else None
    if shape is not None and [int(v) for v in shape] != [n, k]:
        raise InputError(f"mismatched shape: {module}.weight_shape says {shape.tolist()}, packed codes are {[n, k]}")
    scales_dtype = scales.dtype if scales.dtype != np.float64 else np.float32
    return Layer(module, np.ascontiguousarray(codes), scales.astype(scales_dtype), zeros, perm, size)


def _zeros(module: str, words: np.ndarray | None, scheme: Scheme, shape: tuple[int, int]) -> np.ndarray | None:
    """A layer's unsigned zero points [K/G, N]; None for a symmetric layer (all MIDPOINT)."""
    fmt = scheme.format
    if words is None:
        return None
    unpacked = unpack(words, fmt.zero_codes)
    stored = unpacked.T if fmt.out_first else unpacked
    _shape(f"{module}.{fmt.zeros} (unpacked)", stored, shape)
    wide = stored.astype(np.int16) + fmt.zero_offset
    if wide.max() > 15:
        raise InputError(
            f"{module}.{fmt.zeros} stores {int(wide.max()) - fmt.zero_offset}: a zero point of 16 under "
            f"{fmt.name}'s zero-minus-one convention, which 4 bits cannot hold"
        )
    if scheme.symmetric:
        if not (wide == MIDPOINT).all():
            raise InputError(f"{module}: the checkpoint says sym, but its zero points are not all {MIDPOINT}")
        return None
    return wide.astype(np.uint8)


def _permutation(module: str, g_idx: np.ndarray | None, k: int, size: int) -> np.ndarray | None:
    """For act-order (a g_idx not in block order), the stable sort of input channels by group, if every
    group then holds `size` consecutive channels; None where g_idx is channel // size already."""
    if g_idx is None:
        return None
    g_idx = g_idx.astype(np.int64).reshape(-1)
    if g_idx.shape != (k,):
        raise InputError(f"mismatched shape: {module}.g_idx has {g_idx.size} entries for {k} input channels")
    blocks = np.arange(k) // size
    if (g_idx == blocks).all():
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not (g_idx[perm] == blocks).all():
        raise InputError(f"{module}: its g_idx does not give every group exactly {size} input channels")
    return perm


def float_state_dict(layers: list[Layer], rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float model's state dict: the checkpoint's other tensors, and each quantized layer's
    dequantized weight in nn.Linear's [N, K] orientation."""
    import torch

    state = dict(rest)
    for layer in layers:
        state[f"{layer.module}.weight"] = torch.from_numpy(np.ascontiguousarray(layer.weight().T))
    return state


@dataclass
class Prequant:
    """A pre-quantized Hugging Face checkpoint: its scheme, read at resolve time; its tensors when asked."""

    path: Path
    scheme: Scheme

    def load_float(self, cls: Any, config: Any, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
        """The transformers model with the dequantized weights."""
        layers, rest = read_layers(self.path, self.scheme)
        state = float_state_dict(layers, rest)
        del rest
        model, info = cls.from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
        missing = sorted(info.get("missing_keys") or [])
        # Some GPTQ writers keep an all-zero bias on layers that had none: nothing to load.
        quantized = {layer.module for layer in layers}
        unexpected = sorted(
            key
            for key in info.get("unexpected_keys") or []
            if not (key.endswith(".bias") and key[: -len(".bias")] in quantized and not state[key].any())
        )
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which the model has no place for"
            raise InputError(f"{self.path}: the checkpoint {what}")
        return model  # type: ignore[no-any-return]

    def apply(self, proto: onnx.ModelProto, scratch: Path) -> tuple[onnx.ModelProto, list[PassRecord], Quantization]:
        """The exported graph with the checkpoint's codes in place of its float weights."""
        layers, _rest = read_layers(self.path, self.scheme)
        importer = ImportQuantized(self.scheme, layers)
        passes = [OpsetUpgrade(IMPORT_OPSET), importer]
        result = PassManager(passes).run(Model.from_onnx(proto, scratch))
        records = [replace(r, stage="convert") for r in result.records]
        if importer.summary is None:  # the pass did not run: a bug, said as one line
            raise BackendError(f"{self.path}: the import pass wrote no quantization record")
        return result.model.to_onnx(), records, importer.summary


# -- the graph -----------------------------------------------------------------------------------


class ImportQuantized(GraphPass):
    """Each quantized layer's MatMul weight -> DequantizeLinear(codes, scales[, zeros]) (a Gather of
    the input channels in front for act-order layers)."""

    name = "import_quantized"
    runs_after = ("opset_upgrade",)

    def __init__(self, scheme: Scheme, layers: list[Layer]) -> None:
        self.scheme = scheme
        self.layers = layers
        self.summary: Quantization | None = None

    def run(self, model: Model) -> PassResult:
        linears: dict[str, gs.Node] = {}
        for node in model.graph.nodes:
            if is_linear(node) or reads_tied_weight(node):
                linears.setdefault(module_of(node.name) or node.name, node)
        gathers: dict[tuple[str, bytes], gs.Variable] = {}
        counts = {"layers": 0, "zero_points": 0, "act_order": 0}
        for layer in self.layers:
            node = linears.pop(layer.module, None)
            if node is None or reads_tied_weight(node):
                raise InputError(
                    f"the checkpoint quantizes {layer.module}, which is no linear layer of the exported graph"
                )
            self._replace(model, node, layer, gathers)
            counts["layers"] += 1
            counts["zero_points"] += layer.zeros is not None
            counts["act_order"] += layer.perm is not None
        kept = dict.fromkeys(sorted(linears), "not quantized in the checkpoint")
        self.summary = Quantization(
            method=self.scheme.method,
            weights=DType.INT4,
            activations=None,
            granularity="block",
            group_size=self.scheme.group_size,
            alpha=None,
            quantized=[layer.module for layer in self.layers],
            kept=kept,
            smoothed=0,
            scales=self.scheme.describe(),
        )
        logger.info(
            "imported %s from the checkpoint (%d with zero points, %d act-order); %s kept in float",
            plural(counts["layers"], "quantized linear layer"),
            counts["zero_points"],
            counts["act_order"],
            plural(len(kept), "layer"),
        )
        return PassResult(True, counts)

    def _replace(
        self, model: Model, node: gs.Node, layer: Layer, gathers: dict[tuple[str, bytes], gs.Variable]
    ) -> None:
        weight: gs.Constant = node.inputs[1]
        traced = read_values(weight)
        want = layer.weight()
        if traced.shape != want.shape:
            raise InputError(
                f"mismatched shape: {layer.module} is {list(want.shape)} in the checkpoint and "
                f"{list(traced.shape)} in the model"
            )
        if not np.array_equal(traced, want.astype(traced.dtype)):
            raise BackendError(f"{layer.module}: the traced weight is not the checkpoint's dequantized weight")
        dtype = traced.dtype
        del traced, want
        if not np.array_equal(layer.scales.astype(dtype).astype(np.float32), layer.scales.astype(np.float32)):
            logger.warning("%s: its %s scales round in %s", layer.module, layer.scales.dtype, np.dtype(dtype))
        base = layer.module
        # Symmetric: signed codes and no zero point (TensorRT's form); else unsigned codes and zeros.
        codes = layer.codes.astype(DType.UINT4.numpy) if layer.zeros is not None else signed(layer.codes)
        inputs = [model.constant(model.fresh_name(f"{base}.codes"), codes)]
        inputs.append(gs.Constant(model.fresh_name(f"{base}.scales"), layer.scales.astype(dtype)))
        if layer.zeros is not None:
            inputs.append(
                model.constant(model.fresh_name(f"{base}.zero_points"), layer.zeros.astype(DType.UINT4.numpy))
            )
        out = gs.Variable(model.fresh_name(f"{base}.weight_dequantized"), dtype=dtype, shape=list(layer.codes.shape))
        dq = gs.Node(
            "DequantizeLinear",
            name=model.fresh_name(f"{node.name}_weight_dq"),
            inputs=inputs,
            outputs=[out],
            attrs={"axis": 0, "block_size": layer.group},
        )
        model.graph.nodes.append(dq)
        model.tag(dq, f"prequant.{self.scheme.format.name}")
        node.inputs[1] = out
        if layer.perm is not None:
            node.inputs[0] = self._gather(model, node.inputs[0], layer.perm, gathers)

    @staticmethod
    def _gather(
        model: Model, x: gs.Variable, perm: np.ndarray, gathers: dict[tuple[str, bytes], gs.Variable]
    ) -> gs.Variable:
        """x's input channels in the layer's group order (shared by the layers reading x with one order:
        GPTQ's q/k/v share their input's Hessian and so its order)."""
        key = (x.name, perm.tobytes())
        if key not in gathers:
            out = gs.Variable(model.fresh_name(f"{x.name}_act_order"), dtype=x.dtype, shape=x.shape)
            index = gs.Constant(model.fresh_name(f"{x.name}_act_order_index"), perm.astype(np.int64))
            gather = gs.Node("Gather", model.fresh_name(f"{x.name}_act_order"), {"axis": -1}, [x, index], [out])
            model.graph.nodes.append(gather)
            model.tag(gather, "prequant.act_order")
            gathers[key] = out
        return gathers[key]
