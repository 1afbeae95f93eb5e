"""Fuzz safetensors headers of a Hugging Face directory (config.json + model.safetensors) through what
`llm2trt convert DIR` runs first: resolve_model(DIR).load()."""

from __future__ import annotations

import shutil
from pathlib import Path

from hypothesis import given

from llm2trt.convert.sources import resolve_model
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import ByteEdit, Edit
from tests.fuzz.test_lora_adapter import SAFETENSORS, mutate_safetensors


def check(root: Path, weights: tuple[list[Edit] | None, list[ByteEdit] | None]) -> None:
    example()
    seed = seeds.hf_dir(root)
    case = seeds.fresh_copy(seed, root / "work", "hf-case")
    mutate_safetensors(case / "model.safetensors", weights)
    clean(lambda: resolve_model(str(case)).load())
    shutil.rmtree(case)


GIVEN = {"weights": SAFETENSORS}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_safetensors(fuzz_root: Path, weights: tuple[list[Edit] | None, list[ByteEdit] | None]) -> None:
    check(fuzz_root, weights)
