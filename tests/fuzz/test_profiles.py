"""Fuzz `llm2trt build --profiles FILE` (load_profiles, then the shapes each profile makes for the
tiny Llama's graph) and `--profile DIM=MIN:OPT:MAX` (parse_dim_overrides)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm2trt.build.driver import load_profiles, parse_dim_overrides, profile_shapes
from llm2trt.core.errors import InputError
from llm2trt.core.manifest import Manifest
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import JSON, apply, edits

SHORT: dict[str, str] = {"batch": "1:1:2", "sequence": "1:64:128", "past_sequence": "0:0:0"}
SEED = {
    "profiles": [
        {"name": "short", "dims": SHORT},
        {"name": "long", "dims": {"batch": "1", "sequence": "1:256:256", "past_sequence": "1:64:128"}},
    ]
}

RANGES = st.one_of(
    st.text(alphabet="0123456789:²٣ -x", max_size=14),
    st.sampled_from(["1:2:3", "3:2:1", "0:0:0", "1", "9" * 5000, "1:1:" + "9" * 30, "::", "1:2"]),
)
# A whole document (from JSON), an edit of the seed, or the seed with one range replaced.
DOCUMENTS = st.one_of(
    JSON,
    edits(["profiles.0.dims.sequence", "profiles.1.name", "profiles.0.dims", "profiles.0", "profiles"]).map(
        lambda changes: apply(SEED, changes)
    ),
    st.tuples(st.sampled_from(["batch", "sequence", "past_sequence", "width", ""]), RANGES).map(
        lambda dim: {"profiles": [{"name": "p", "dims": {**SHORT, dim[0]: dim[1]}}]}
    ),
)


def check(root: Path, document: Any, flag: str) -> None:
    example()
    manifest = Manifest.read(seeds.artifact(root))
    path = root / "work" / "profiles.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(document))

    def read() -> None:
        for dims in load_profiles(path).values():
            profile_shapes(manifest.graph(), {**manifest.dynamic_dims, **dims})

    clean(read)
    clean(lambda: parse_dim_overrides([flag]))


GIVEN = {
    "document": DOCUMENTS,
    "flag": st.one_of(RANGES, RANGES.map(lambda r: f"sequence={r}")),
}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_profiles(fuzz_root: Path, document: Any, flag: str) -> None:
    check(fuzz_root, document, flag)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


@pytest.mark.parametrize("value", ["9" * 5000, "1:²:3", "٣"])
def test_a_range_that_is_not_ascii_digits_is_one_line(tmp_path: Path, value: str) -> None:
    """Before: ValueError from int() (4300+ digits; "²".isdigit() is True but int("²") fails)."""
    with pytest.raises(InputError, match="bad --profile"):
        parse_dim_overrides([f"sequence={value}"])
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"profiles": [{"name": "p", "dims": {"sequence": value}}]}))
    with pytest.raises(InputError, match="bad --profile"):
        load_profiles(path)


def test_an_integer_of_5000_digits_in_the_file_is_one_line(tmp_path: Path) -> None:
    """Before: ValueError (int() refuses 4300+ digits) out of json.loads, not a JSONDecodeError."""
    path = tmp_path / "profiles.json"
    path.write_text('{"profiles": ' + "1" * 5000 + "}")
    with pytest.raises(InputError, match="cannot read it as JSON"):
        load_profiles(path)
