"""Fuzz GGUF files through what `llm2trt convert x.gguf` runs first: resolve_model (the metadata) and,
when that parses, load() (the tensors). The mutations: the header's version and counts, bytes of the
metadata and tensor tables, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm2trt.convert.sources import resolve_model
from llm2trt.core.errors import InputError
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import BYTE_EDITS, ByteEdit, apply_bytes

# The region edits land in: the header (magic, version, tensor and metadata counts: 24 bytes), the
# metadata and tensor tables (the vocabulary ends near 25 KB), or anywhere.
REGIONS = st.sampled_from([24, 4096, 32768, None])


def check(root: Path, region: int | None, changes: list[ByteEdit]) -> None:
    example()
    seed = seeds.gguf_file(root)
    case = root / "work" / "case.gguf"
    case.parent.mkdir(exist_ok=True)
    case.write_bytes(apply_bytes(seed.read_bytes(), changes, region))

    def read() -> None:
        resolve_model(str(case)).load()

    clean(read)
    case.unlink()


GIVEN = {"region": REGIONS, "changes": BYTE_EDITS}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_gguf(fuzz_root: Path, region: int | None, changes: list[ByteEdit]) -> None:
    check(fuzz_root, region, changes)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        (24, None),  # the file cut after its header; before: struct.error from transformers' reader
        (12000, None),  # cut inside the vocabulary; before: struct.error
        (2399, b"\x00\x00\x80"),  # a metadata length past any file; before: OverflowError (C ssize_t)
    ],
)
def test_a_broken_gguf_is_one_line(fuzz_root: Path, edit: tuple[int, bytes | None]) -> None:
    at, data = edit
    blob = seeds.gguf_file(fuzz_root).read_bytes()
    case = fuzz_root / "work" / "regression.gguf"
    case.parent.mkdir(exist_ok=True)
    case.write_bytes(blob[:at] if data is None else blob[:at] + data + blob[at + len(data) :])
    with pytest.raises(InputError, match="cannot read GGUF file"):
        resolve_model(str(case))
