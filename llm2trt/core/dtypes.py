"""`DType`: the one place that knows how an element type is spelled in each library.

Names (the manifest's and the CLI's vocabulary: fp32, fp16, bf16, int64, ...), NumPy (with
ml_dtypes for bfloat16, float8 and int4), ONNX's TensorProto enum, torch and TensorRT all map
through here, and the float types carry their default numeric tolerances. Anything else in
llm2trt asks a `DType` instead of switching on strings (tests/test_dtypes.py checks the source).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
from onnx import TensorProto

from llm2trt.core.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tolerance:
    """Default normwise relative tolerances: a graph against its PyTorch reference (`compare`), and
    an optimized graph against its input graph, both in ONNX Runtime (`optimize`)."""

    compare: float
    optimize: float


@dataclass(frozen=True)
class _Spelling:
    numpy: Any  # a NumPy scalar type (ml_dtypes for what NumPy lacks)
    onnx: int
    torch: str | None  # attribute of the torch module
    trt: str | None  # attribute of TensorRT's DataType
    aliases: tuple[str, ...]
    tolerance: Tolerance | None = None


class DType(enum.Enum):
    """An element type, named as the manifest and the CLI name it."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8e4m3"
    INT64 = "int64"
    INT32 = "int32"
    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    UINT4 = "uint4"  # an imported checkpoint's asymmetric codes and zero points
    BOOL = "bool"

    @classmethod
    def parse(cls, value: object) -> DType:
        """A DType from any spelling: our name, an alias (float16), a NumPy dtype, an ONNX enum, a torch
        dtype, a TensorRT DataType."""
        found = cls.find(value)
        if found is None:
            names = ", ".join(d.value for d in cls)
            raise InputError(f"unknown dtype {value!r}; llm2trt knows {names}")
        return found

    @classmethod
    def find(cls, value: object) -> DType | None:
        """Like `parse`, but None for a type llm2trt does not handle (float64, strings, ...)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return _BY_ONNX.get(int(value))
        if isinstance(value, str):
            return _BY_NAME.get(value.lower())
        torch_name = _torch_name(value)
        if torch_name is not None:
            return _BY_NAME.get(torch_name)
        trt_name = _trt_name(value)
        if trt_name is not None:
            return _BY_TRT.get(trt_name)
        try:
            return _BY_NAME.get(np.dtype(value).name)  # type: ignore[call-overload]
        except TypeError:
            return None

    @classmethod
    def float_choices(cls) -> tuple[str, ...]:
        """The dtypes a model can be exported in."""
        return (cls.FP32.value, cls.FP16.value, cls.BF16.value)

    @property
    def _spelling(self) -> _Spelling:
        return _SPELLINGS[self]

    @property
    def numpy(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(self._spelling.numpy)
        return dtype

    @property
    def host_numpy(self) -> np.dtype[Any]:
        """The NumPy dtype results are compared in on the host: bfloat16 widens to float32 (what
        `to_numpy` returns), since NumPy arithmetic has no bfloat16."""
        return np.dtype(np.float32) if self is DType.BF16 else self.numpy

    @property
    def onnx(self) -> int:
        return self._spelling.onnx

    @property
    def torch(self) -> torch.dtype:
        import torch

        name = self._spelling.torch
        if name is None:
            raise InputError(f"torch has no {self.value} tensors")
        return getattr(torch, name)  # type: ignore[no-any-return]

    def trt(self, module: Any) -> Any:
        """TensorRT's DataType member, from the imported TensorRT (or TensorRT-RTX) module."""
        name = self._spelling.trt
        if name is None or not hasattr(module.DataType, name):
            raise InputError(f"TensorRT has no {self.value} data type")
        return getattr(module.DataType, name)

    @property
    def triton(self) -> str:
        """Triton's spelling, as in a kernel signature's `*fp16` (the types llm2trt's kernels take)."""
        names = {DType.FP32: "fp32", DType.FP16: "fp16", DType.BF16: "bf16", DType.INT8: "i8", DType.INT32: "i32"}
        if self not in names:
            raise InputError(f"no Triton kernel here takes {self.value}")
        return names[self]

    @property
    def is_float(self) -> bool:
        return self._spelling.tolerance is not None

    @property
    def tolerance(self) -> Tolerance:
        tol = self._spelling.tolerance
        if tol is None:
            raise ValueError(f"{self.value} is not a float type: it has no numeric tolerance")
        return tol

    def cast(self, array: np.ndarray) -> np.ndarray:
        """`array` in this dtype (NumPy arrays of bfloat16 and friends come from ml_dtypes)."""
        return np.asarray(array).astype(self.numpy)


_SPELLINGS: dict[DType, _Spelling] = {
    DType.FP32: _Spelling(
        np.float32, TensorProto.FLOAT, "float32", "FLOAT", ("float32", "float"), Tolerance(1e-4, 1e-5)
    ),
    DType.FP16: _Spelling(
        np.float16, TensorProto.FLOAT16, "float16", "HALF", ("float16", "half"), Tolerance(1e-2, 1e-2)
    ),
    DType.BF16: _Spelling(
        ml_dtypes.bfloat16, TensorProto.BFLOAT16, "bfloat16", "BF16", ("bfloat16",), Tolerance(5e-2, 3e-2)
    ),
    DType.FP8: _Spelling(
        ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, "float8_e4m3fn", "FP8", ("float8_e4m3fn", "fp8")
    ),
    DType.INT64: _Spelling(np.int64, TensorProto.INT64, "int64", "INT64", ()),
    DType.INT32: _Spelling(np.int32, TensorProto.INT32, "int32", "INT32", ()),
    DType.INT8: _Spelling(np.int8, TensorProto.INT8, "int8", "INT8", ()),
    DType.UINT8: _Spelling(np.uint8, TensorProto.UINT8, "uint8", "UINT8", ()),
    DType.INT4: _Spelling(ml_dtypes.int4, TensorProto.INT4, None, "INT4", ()),
    DType.UINT4: _Spelling(ml_dtypes.uint4, TensorProto.UINT4, None, None, ()),
    DType.BOOL: _Spelling(np.bool_, TensorProto.BOOL, "bool", "BOOL", ()),
}
_BY_NAME: dict[str, DType] = {
    name: dtype for dtype, s in _SPELLINGS.items() for name in (dtype.value, np.dtype(s.numpy).name, *s.aliases)
}
_BY_ONNX: dict[int, DType] = {s.onnx: dtype for dtype, s in _SPELLINGS.items()}
_BY_TRT: dict[str, DType] = {s.trt: dtype for dtype, s in _SPELLINGS.items() if s.trt}


def _torch_name(value: object) -> str | None:
    """'float16' for torch.float16, without importing torch (None for anything else)."""
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return None


def _trt_name(value: object) -> str | None:
    """'HALF' for TensorRT's (or TensorRT-RTX's) DataType.HALF, without importing it."""
    kind = type(value)
    if kind.__name__ == "DataType" and kind.__module__.split(".")[0].startswith("tensorrt"):
        return str(getattr(value, "name", ""))
    return None


def onnx_elem_type(value: object) -> int | None:
    """ONNX's element-type enum for any NumPy dtype or DType spelling (None when unknown): graphs
    may hold types llm2trt has no DType for (float64), and rewrite rules still compare them."""
    found = DType.find(value)
    if found is not None:
        return found.onnx
    if value is None:
        return None
    try:
        import onnx

        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(value)))  # type: ignore[call-overload]
    except (TypeError, KeyError, ValueError):
        return None


def numpy_of_onnx(elem_type: int) -> np.dtype[Any]:
    """The NumPy dtype of an ONNX element type (graph I/O, tensors)."""
    found = DType.find(elem_type)
    if found is not None:
        return found.numpy
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def name_of_onnx(elem_type: int) -> str:
    """The manifest's name of an ONNX element type, or NumPy's for types outside DType."""
    found = DType.find(elem_type)
    return found.value if found is not None else numpy_of_onnx(elem_type).name


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A NumPy array as a torch tensor of the same dtype (bfloat16 through its bits)."""
    import torch

    array = np.ascontiguousarray(array)
    if DType.find(array.dtype) is DType.BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as NumPy on the host; bfloat16 widens to float32 (what comparisons need)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
