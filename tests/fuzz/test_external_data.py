"""Fuzz the external-data tables of an artifact's model.onnx (location, offset, length of each weight)
through what every command reads them with: Manifest.onnx_path (every command), load_onnx with the
weights, and verify_weights (`inspect --verify`, `build`). A read of a file outside the artifact fails."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm2trt.core.artifact import load_onnx
from llm2trt.core.errors import InputError
from llm2trt.core.manifest import Manifest
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fenced, fuzz_settings
from tests.fuzz.mutate import OUTSIDE, PATHS

_NUMBERS = st.one_of(
    st.integers(min_value=-(2**65), max_value=2**65).map(str),
    st.sampled_from(["", "0", "4096", "-0", "+1", " 1", "1.5", "1e3", "²", "٣", "0x10", "9" * 40, "9" * 5000, "\x00"]),
)


@dataclass(frozen=True)
class Entry:
    """Set (or with `value` None, drop) key `key` of the `tensor`-th external tensor's table."""

    tensor: int
    key: str
    value: str | None


ENTRIES = st.lists(
    st.builds(
        Entry,
        tensor=st.integers(min_value=0, max_value=10_000),
        key=st.sampled_from(["location", "offset", "length", "checksum", "basepath", "other"]),
        value=st.one_of(st.none(), PATHS, _NUMBERS, st.text(max_size=8)),
    ).filter(lambda e: e.key == "location" or e.value is None or not e.value.startswith(("/", ".", "x", "l", "m"))),
    min_size=1,
    max_size=4,
)


def _set(tensor: onnx.TensorProto, key: str, value: str | None) -> None:
    kept = [(e.key, e.value) for e in tensor.external_data if e.key != key]
    if value is not None:
        kept.append((key, value))
    del tensor.external_data[:]
    for k, v in kept:
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def check(root: Path, entries: list[Entry]) -> None:
    example()
    seed = seeds.artifact(root)
    (root / OUTSIDE).parent.mkdir(exist_ok=True)
    (root / OUTSIDE).write_bytes(os.urandom(1 << 16))
    case = seeds.fresh_copy(seed, root / "work", "external-case")
    os.symlink(root / OUTSIDE, case / "link.data")
    model = onnx.load(str(case / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for entry in entries:
        _set(external[entry.tensor % len(external)], entry.key, entry.value)
    onnx.save(model, str(case / "model.onnx"))

    def read() -> None:
        manifest = Manifest.read(case)
        manifest.onnx_path(case)
        load_onnx(case / "model.onnx", with_weights=True)
        manifest.verify_weights(case)

    with fenced(root, case):
        clean(read)
    shutil.rmtree(case)


GIVEN = {"entries": ENTRIES}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_external_data(fuzz_root: Path, entries: list[Entry]) -> None:
    check(fuzz_root, entries)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("location", "x" * 300, "cannot be looked up"),  # before: OSError [Errno 36] File name too long
        ("location", "a\x00b", "cannot be looked up"),  # before: ValueError: embedded null byte
        ("offset", "²", "bad offset or length"),  # before: ValueError from int() ("²".isdigit() is True)
        ("length", "9" * 5000, "bad offset or length"),  # before: ValueError, int() refuses 4300+ digits
    ],
)
def test_a_bad_external_data_entry_is_one_line(fuzz_root: Path, key: str, value: str, message: str) -> None:
    seed = seeds.artifact(fuzz_root)
    case = seeds.fresh_copy(seed, fuzz_root / "work", "regression")
    model = onnx.load(str(case / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    _set(tensor, key, value)
    onnx.save(model, str(case / "model.onnx"))
    with pytest.raises(InputError, match=message):
        load_onnx(case / "model.onnx")
