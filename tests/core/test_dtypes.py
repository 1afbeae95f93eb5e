"""DType: every spelling maps through it, and it is the only module that knows the spellings."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import tensorrt_rtx
import torch

from llm2trt.core.dtypes import DType, name_of_onnx, onnx_elem_type, to_numpy, to_torch
from llm2trt.core.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "dtype, numpy, onnx_type, torch_type",
    [
        (DType.FP32, np.float32, onnx.TensorProto.FLOAT, torch.float32),
        (DType.FP16, np.float16, onnx.TensorProto.FLOAT16, torch.float16),
        (DType.BF16, ml_dtypes.bfloat16, onnx.TensorProto.BFLOAT16, torch.bfloat16),
        (DType.INT64, np.int64, onnx.TensorProto.INT64, torch.int64),
        (DType.BOOL, np.bool_, onnx.TensorProto.BOOL, torch.bool),
        (DType.FP8, ml_dtypes.float8_e4m3fn, onnx.TensorProto.FLOAT8E4M3FN, torch.float8_e4m3fn),
    ],
)
def test_every_spelling_maps_to_one_dtype(dtype: DType, numpy: type, onnx_type: int, torch_type: torch.dtype) -> None:
    assert dtype.numpy == np.dtype(numpy) and dtype.onnx == onnx_type and dtype.torch == torch_type
    for spelling in (dtype.value, np.dtype(numpy), np.dtype(numpy).name, onnx_type, torch_type, dtype):
        assert DType.parse(spelling) is dtype, spelling
    assert name_of_onnx(onnx_type) == dtype.value
    assert DType.parse(dtype.trt(tensorrt_rtx)) is dtype  # what an engine reports its tensors as


def test_aliases_tolerances_and_refusals() -> None:
    assert DType.parse("float16") is DType.FP16 and DType.parse("Half") is DType.FP16
    assert DType.float_choices() == ("fp32", "fp16", "bf16")
    assert (DType.FP32.tolerance.compare, DType.FP16.tolerance.compare, DType.BF16.tolerance.compare) == (
        1e-4,
        1e-2,
        5e-2,
    )
    assert DType.FP32.tolerance.optimize == 1e-5
    assert not DType.INT64.is_float
    with pytest.raises(ValueError, match="not a float type"):
        _ = DType.INT64.tolerance
    with pytest.raises(InputError, match="unknown dtype 'fp64'"):
        DType.parse("fp64")
    assert DType.find(np.float64) is None and onnx_elem_type(np.float64) == onnx.TensorProto.DOUBLE
    assert DType.BF16.host_numpy == np.float32 and DType.FP16.host_numpy == np.float16


def test_bfloat16_round_trips_through_torch() -> None:
    values = DType.BF16.cast(np.array([1.5, -2.25, 3.0], dtype=np.float32))
    tensor = to_torch(values)
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [1.5, -2.25, 3.0]
    back = to_numpy(tensor)
    assert back.dtype == np.float32 and back.tolist() == [1.5, -2.25, 3.0]


# A float dtype named as a string, or through torch/ONNX/ml_dtypes attributes: a translation only
# llm2trt/core/dtypes.py may make. (Generating data with np.float32 or np.int64 is not one.)
_SPELLING = re.compile(
    r"""["'](?:fp32|fp16|bf16|float16|float32|bfloat16|fp8e4m3)["']"""
    r"|torch\.(?:float16|bfloat16|float32|half)\b|TensorProto\.(?:FLOAT|FLOAT16|BFLOAT16)\b"
    r"|\bml_dtypes\b|tensor_dtype_to_np_dtype|np_dtype_to_tensor_dtype"
)


def dtype_spellings(root: Path) -> list[str]:
    found = []
    for package in ("llm2trt", "exporters", "passes", "plugins"):
        for path in sorted((root / package).rglob("*.py")):
            if path.relative_to(root).as_posix() == "llm2trt/core/dtypes.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _SPELLING.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_dtype_spelling_outside_the_dtype_module(tmp_path: Path) -> None:
    assert dtype_spellings(ROOT) == []
    # The scan can fail: a stray switch in a stage is found.
    (tmp_path / "llm2trt").mkdir()
    (tmp_path / "llm2trt" / "stage.py").write_text('if dtype == "fp16":\n    pass\n')
    assert dtype_spellings(tmp_path) == ['llm2trt/stage.py:1: if dtype == "fp16":']
