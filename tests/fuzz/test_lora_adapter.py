"""Fuzz PEFT LoRA adapters (read_adapter): a mutated adapter_config.json, a mutated
adapter_model.safetensors (header length, header JSON, bytes), or both."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm2trt.core.errors import InputError
from llm2trt.core.lora import read_adapter
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import BYTE_EDITS, ByteEdit, Edit, apply, apply_bytes, edits

CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "use_rslora", "alpha_pattern", "bias", "fan_in_fan_out", "use_dora"]


def header(blob: bytes) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header: its length field and its JSON."""
    (length,) = struct.unpack("<Q", blob[:8])
    return length, json.loads(blob[8 : 8 + length])


def with_header(blob: bytes, changes: list[Edit]) -> bytes:
    """`blob` with its header JSON edited (the length field follows the new JSON; the data stays)."""
    length, doc = header(blob)
    text = json.dumps(apply(doc, changes)).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


# A safetensors mutation: of its header JSON (entries' dtype, shape, data_offsets), or of its bytes
# within the header (the length field first), or both.
SAFETENSORS = st.tuples(
    st.one_of(
        st.none(),
        edits(
            ["*.dtype", "*.shape", "*.data_offsets", "*.data_offsets.1", "__metadata__"],
            # values a writer could put there: other dtypes (of the same and other widths), shapes, offsets
            values=st.one_of(
                st.sampled_from(["F16", "BF16", "I32", "U8", "I64", "F64", "BOOL", "F8_E4M3", "F4"]),
                st.lists(st.integers(min_value=0, max_value=2**20), max_size=3),
            ),
        ),
    ),
    st.one_of(st.none(), BYTE_EDITS),
)


def mutate_safetensors(path: Path, how: tuple[list[Edit] | None, list[ByteEdit] | None]) -> None:
    blob = path.read_bytes()
    json_edits, byte_edits = how
    if json_edits:
        blob = with_header(blob, json_edits)
    if byte_edits:
        blob = apply_bytes(blob, byte_edits, region=8 + header(blob)[0] if not json_edits else 64)
    path.write_bytes(blob)


def check(root: Path, config: list[Edit] | None, weights: tuple[list[Edit] | None, list[ByteEdit] | None]) -> None:
    example()
    seed = seeds.adapter(root)
    case = seeds.fresh_copy(seed, root / "work", "adapter-case")
    if config:
        document = json.loads((case / "adapter_config.json").read_text())
        (case / "adapter_config.json").write_text(json.dumps(apply(document, config)))
    mutate_safetensors(case / "adapter_model.safetensors", weights)
    clean(lambda: read_adapter(case))
    shutil.rmtree(case)


GIVEN = {
    "config": st.one_of(st.none(), edits(CONFIG_KEYS)),
    "weights": SAFETENSORS,
}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_lora_adapter(
    fuzz_root: Path, config: list[Edit] | None, weights: tuple[list[Edit] | None, list[ByteEdit] | None]
) -> None:
    check(fuzz_root, config, weights)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


def _config(root: Path, **fields: Any) -> Path:
    case = seeds.fresh_copy(seeds.adapter(root), root / "work", "regression")
    document = json.loads((case / "adapter_config.json").read_text())
    (case / "adapter_config.json").write_text(json.dumps({**document, **fields}))
    return case


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_alpha": None}, "lora_alpha is None, expected a finite number"),  # before: TypeError from float()
        ({"lora_alpha": 10**400}, "lora_alpha is 1000000000"),  # before: OverflowError from float()
        ({"lora_alpha": "eight"}, "lora_alpha is 'eight'"),  # before: ValueError from float()
        ({"lora_alpha": float("nan")}, "lora_alpha is nan"),  # before: accepted, every merged weight NaN
        ({"alpha_pattern": {"(": 16}}, "alpha_pattern key '\\(' is not a regular expression"),  # before: re.error
        ({"alpha_pattern": {"q_proj": [16]}}, "alpha_pattern\\['q_proj'\\] is \\[16\\]"),  # before: TypeError
    ],
)
def test_a_bad_alpha_is_one_line(fuzz_root: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_adapter(_config(fuzz_root, **fields))


def test_a_rank_zero_pair_is_refused(fuzz_root: Path) -> None:
    """Before: ZeroDivisionError (alpha / rank)."""
    from safetensors.numpy import save_file

    case = _config(fuzz_root)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = np.zeros((0, 64), np.float32), np.zeros((64, 0), np.float32)
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(case / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="has rank 0"):
        read_adapter(case)


def test_an_integer_of_5000_digits_in_the_config_is_one_line(fuzz_root: Path) -> None:
    """Before: ValueError (int() refuses 4300+ digits) out of json.loads, not a JSONDecodeError."""
    case = _config(fuzz_root)
    (case / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "1" * 5000 + "}")
    with pytest.raises(InputError, match="is not JSON"):
        read_adapter(case)


def test_a_tensor_name_with_a_line_break_is_quoted(fuzz_root: Path) -> None:
    """Before: the name printed as is, its newline breaking the error into two lines."""
    from safetensors.numpy import save_file

    case = _config(fuzz_root)
    save_file(
        {"base_model.model.x\ny.lora_C.weight": np.zeros((4, 64), np.float32)}, str(case / "adapter_model.safetensors")
    )
    with pytest.raises(
        InputError, match=re.escape("tensor 'base_model.model.x\\ny.lora_C.weight' is not a LoRA")
    ) as raised:
        read_adapter(case)
    assert len(str(raised.value).splitlines()) == 1
