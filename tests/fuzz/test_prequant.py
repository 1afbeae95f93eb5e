"""Fuzz pre-quantized checkpoints' configs (GPTQ, AWQ, compressed-tensors) through what `llm2trt convert
DIR` reads before any weight: resolve_model(DIR), which checks config.json's quantization_config (or
AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm2trt.convert.prequant import read_scheme
from llm2trt.convert.sources import resolve_model
from llm2trt.core.errors import InputError
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import Edit, apply, edits

GPTQ = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "sym": True,
    "desc_act": False,
    "checkpoint_format": "gptq",
}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
COMPRESSED = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
        }
    },
}
KEYS = [
    "quant_method",
    "bits",
    "group_size",
    "sym",
    "desc_act",
    "checkpoint_format",
    "dynamic",
    "pack_dtype",
    "zero_point",
    "version",
    "w_bit",
    "q_group_size",
    "config_groups",
    "config_groups.group_0",
    "config_groups.group_0.weights",
    "config_groups.group_0.weights.group_size",
    "config_groups.group_0.format",
    "quantization_status",
]
# Where the config goes: config.json's quantization_config, or a legacy file beside it.
FILES = st.sampled_from(["config.json", "quantize_config.json", "quant_config.json"])


def check(root: Path, file: str, seed: dict[str, Any], changes: list[Edit]) -> None:
    """`seed` with `changes` made, written to `file` of a copy of the tiny Llama's directory."""
    example()
    config = apply(seed, changes)
    seed_dir = seeds.hf_dir(root)
    case = seeds.fresh_copy(seed_dir, root / "work", "prequant-case")
    if file == "config.json":
        document = json.loads((case / "config.json").read_text())
        (case / "config.json").write_text(json.dumps({**document, "quantization_config": config}))
    else:
        (case / file).write_text(json.dumps(config))
    clean(lambda: resolve_model(str(case)))
    shutil.rmtree(case)


GIVEN = {
    "file": FILES,
    "seed": st.sampled_from([GPTQ, AWQ, COMPRESSED]),
    "changes": edits(KEYS),
}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_prequant(fuzz_root: Path, file: str, seed: dict[str, Any], changes: list[Edit]) -> None:
    check(fuzz_root, file, seed, changes)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # before: AttributeError: 'NoneType' object has no attribute 'get'
        ({**COMPRESSED, "config_groups": {"group_0": None}}, "config group 'group_0' is not an object"),
        ({**COMPRESSED, "config_groups": {"group_0": {"weights": [4]}}}, "config group 'group_0' is not an object"),
        ({**GPTQ, "checkpoint_format": ["gptq"]}, "checkpoint_format \\['gptq'\\]"),  # before: TypeError, unhashable
    ],
)
def test_a_malformed_quantization_config_is_one_line(fuzz_root: Path, config: dict[str, Any], message: str) -> None:
    case = seeds.fresh_copy(seeds.hf_dir(fuzz_root), fuzz_root / "work", "regression")
    document = json.loads((case / "config.json").read_text())
    (case / "config.json").write_text(json.dumps({**document, "quantization_config": config}))
    with pytest.raises(InputError, match=message):
        resolve_model(str(case))


def test_an_unhashable_actorder_is_read_as_a_value() -> None:
    """Before: TypeError (unhashable list) from the set of config groups' schemes; now a scheme
    whose act-order is off (only "group" turns it on)."""
    group = {**COMPRESSED["config_groups"]["group_0"]}  # type: ignore[index]
    group["weights"] = {**group["weights"], "actorder": ["group"]}
    scheme = read_scheme({**COMPRESSED, "config_groups": {"group_0": group}}, Path("config.json"))
    assert scheme.group_size == 32 and not scheme.act_order


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**GPTQ, "bits": "\r"}, "GPTQ checkpoint with '\\\\r'-bit weights"),
        ({**GPTQ, "bits": "\x85"}, "GPTQ checkpoint with '\\\\x85'-bit weights"),
        ({**GPTQ, "pack_dtype": "int8\nint32"}, "packed in 'int8\\\\nint32'"),
    ],
)
def test_a_value_with_a_line_break_is_quoted(config: dict[str, Any], message: str) -> None:
    """Before: the value printed as is, a carriage return or NEL (U+0085) breaking the error into two
    lines (a log reader, or a terminal, sees a second line the file wrote)."""
    with pytest.raises(InputError, match=message) as raised:
        read_scheme(config, Path("config.json"))
    assert len(str(raised.value).splitlines()) == 1


def test_a_group_type_with_a_line_break_is_quoted() -> None:
    group = {**COMPRESSED["config_groups"]["group_0"]}  # type: ignore[index]
    group["weights"] = {**group["weights"], "type": "\x85"}
    with pytest.raises(InputError, match="is '\\\\x85' 'group'") as raised:
        read_scheme({**COMPRESSED, "config_groups": {"group_0": group}}, Path("config.json"))
    assert len(str(raised.value).splitlines()) == 1
