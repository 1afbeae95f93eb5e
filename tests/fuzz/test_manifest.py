"""Fuzz the artifact manifest (Manifest.read and what `inspect --verify` does with it): wrong types,
missing keys, huge numbers, paths leaving the artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from llm2trt.core.errors import InputError
from llm2trt.core.manifest import Manifest
from llm2trt.inspect.driver import inspect
from tests.fuzz import seeds
from tests.fuzz.common import clean, example, fuzz_settings
from tests.fuzz.mutate import OUTSIDE, Edit, apply, edits

KEYS = [
    "graphs.*.onnx",
    "graphs.*.external_data.0",
    "graphs.*.external_data_sha256.0",
    "graphs.*.external_data",
    "graphs.*.dims.*",
    "graphs.*.inputs.0.shape",
    "graphs.*.kv_cache",
    "graphs.*.lora",
    "generation.tokenizer",
    "dtype",
    "graphs",
    "passes",
    "timings.pass_seconds",
    "quantization",
    "tensor_parallel",
    "source",
]


def prepare(root: Path) -> tuple[Path, dict[str, Any]]:
    seed = seeds.artifact(root)
    (root / OUTSIDE).parent.mkdir(exist_ok=True)
    (root / OUTSIDE).write_bytes(b"secret")
    return seed, json.loads((seed / "manifest.json").read_text())


def run(root: Path, document: Any) -> None:
    """Write `document` as the manifest of a copy of the seed artifact; inspect it (weights verified)."""
    seed, _ = prepare(root)
    case = seeds.fresh_copy(seed, root / "work", "manifest-case")
    (case / "manifest.json").write_text(json.dumps(document))

    def read() -> None:
        view = inspect(case, verify=True)
        view.render()
        json.dumps(view.to_dict())
        manifest = Manifest.read(case)
        for name in manifest.graphs:
            manifest.onnx_path(case, name)

    clean(read)
    shutil.rmtree(case)


def check(root: Path, changes: list[Edit]) -> None:
    example()
    _, document = prepare(root)
    run(root, apply(document, changes))


GIVEN = {"changes": edits(KEYS)}  # what each example draws (scripts/fuzz.py runs it too)


@fuzz_settings()
@given(**GIVEN)
def test_fuzz_manifest(fuzz_root: Path, changes: list[Edit]) -> None:
    check(fuzz_root, changes)


# -- regressions: inputs the fuzzer found, each now one line -------------------------------------------


def _with_graph(root: Path, **fields: Any) -> Path:
    """A copy of the seed artifact whose default graph has `fields` replaced."""
    seed, document = prepare(root)
    case = seeds.fresh_copy(seed, root / "work", "regression")
    graph = next(iter(document["graphs"].values()))
    graph.update(fields)
    (case / "manifest.json").write_text(json.dumps(document))
    return case


def test_an_onnx_name_longer_than_name_max_is_refused(fuzz_root: Path) -> None:
    """Before: OSError [Errno 36] File name too long from is_file(), an internal error."""
    for name in ("x" * 300, "a\x00b", ""):
        case = _with_graph(fuzz_root, onnx=name)
        with pytest.raises(InputError, match="is not a usable file name"):
            inspect(case)


def test_weights_that_are_a_device_are_refused_not_hashed_forever(fuzz_root: Path) -> None:
    """Before: `inspect --verify` hashed /dev/zero, never returning."""
    case = _with_graph(fuzz_root, external_data=["/dev/zero"])
    with pytest.raises(InputError, match="missing or not a regular file"):
        inspect(case, verify=True)


def test_the_cli_says_it_in_one_line(fuzz_root: Path) -> None:
    """The same input through `llm2trt inspect`: before, an `internal error: OSError` line (exit 3)."""
    from tests.conftest import assert_clean_failure, run_cli

    case = _with_graph(fuzz_root, onnx="x" * 300)
    assert_clean_failure(run_cli("inspect", case), "is not a usable file name")


@pytest.mark.parametrize(
    "fields",
    [
        {"timings": "../outside/secret.data"},  # before: AttributeError: 'str' object has no attribute 'get'
        {"passes": ["x"], "timings": {"pass_seconds": [1.0]}},  # before: TypeError from {**"x", ...}
    ],
)
def test_timings_that_are_not_an_object_are_one_line(fuzz_root: Path, fields: dict[str, Any]) -> None:
    seed, document = prepare(fuzz_root)
    case = seeds.fresh_copy(seed, fuzz_root / "work", "regression")
    (case / "manifest.json").write_text(json.dumps({**document, **fields}))
    if "passes" in fields:
        with pytest.raises(InputError, match="is malformed"):
            Manifest.read(case)
    else:
        Manifest.read(case)  # timings are informational: a bad one is ignored, as a missing one is


def test_weights_that_cannot_be_read_are_one_line(fuzz_root: Path) -> None:
    """Before: OSError [Errno 5] from hashing /proc/self/mem (it stats as a regular file), an internal error."""
    case = _with_graph(fuzz_root, external_data=["/proc/self/mem"])
    with pytest.raises(InputError, match="cannot read weights file /proc/self/mem"):
        inspect(case, verify=True)


def test_an_integer_of_5000_digits_is_one_line(fuzz_root: Path) -> None:
    """Before: ValueError (int() refuses 4300+ digits) out of json.loads, which Manifest.read did not catch."""
    seed, _ = prepare(fuzz_root)
    case = seeds.fresh_copy(seed, fuzz_root / "work", "regression")
    text = (case / "manifest.json").read_text()
    (case / "manifest.json").write_text(text.replace('"opset": ', '"opset": ' + "1" * 5000 + ', "x": ', 1))
    with pytest.raises(InputError, match=r"cannot read .*Exceeds the limit"):
        Manifest.read(case)


def test_a_float_field_of_400_digits_is_one_line(fuzz_root: Path) -> None:
    """Before: OverflowError from float() on an integer past float's range."""
    seed, document = prepare(fuzz_root)
    case = seeds.fresh_copy(seed, fuzz_root / "work", "regression")
    passes = [{"name": "p", "modified": True, "counts": {}}]
    document = {**document, "passes": passes, "timings": {"pass_seconds": [10**400]}}
    (case / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(InputError, match="expected a float, found an integer of 401 digits"):
        Manifest.read(case)
