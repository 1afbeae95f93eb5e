"""Mutations the fuzz targets share: of JSON documents (a value replaced, a key dropped, a path that
leaves the directory) and of bytes (flips, overwritten counts, truncation)."""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

OUTSIDE = "outside/secret.data"  # under the fuzz root, beside every case: a read of it is a read outside

# Values a hostile or broken writer puts where a number, a string, a list or an object belongs.
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "\x00", "²", "٣", "1e3", " 7", "-5", "0x10", "fp16", "int4", "LORA", "none"]),
)
PATHS = st.sampled_from(
    [
        "../" + OUTSIDE,
        "../../etc/passwd",
        "/etc/passwd",
        "/dev/zero",
        "/dev/urandom",
        "/proc/self/mem",
        ".",
        "..",
        "",
        "a\x00b",
        "model.onnx",
        "model.onnx.data",
        "manifest.json",
        "nested/../model.onnx.data",
        "link.data",
        "missing.data",
        "x" * 300,
    ]
)
JSON = st.recursive(
    st.one_of(_SCALARS, PATHS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


@dataclass(frozen=True)
class Edit:
    """One change to a JSON document: at the `pick`-th path (mod their count, or `key` when the
    document has it), replace the value (`value`), or drop it (`drop`)."""

    pick: int
    key: str | None
    drop: bool
    value: Any


def edits(
    keys: list[str], max_size: int = 3, values: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[list[Edit]]:
    """Edits of any path, or of the named `keys` (dotted paths a target cares about most), to any
    JSON value or path, or to one of `values` (ones the format could hold)."""
    one = st.builds(
        Edit,
        pick=st.integers(min_value=0, max_value=10_000),
        key=st.one_of(st.none(), st.sampled_from(keys)) if keys else st.none(),
        drop=st.sampled_from([False, False, False, True]),
        value=st.one_of(JSON, PATHS, *([values] if values is not None else [])),
    )
    return st.lists(one, min_size=1, max_size=max_size)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


def _dotted(doc: Any, key: str) -> tuple[Any, ...] | None:
    """The path of a dotted key (`graphs.*.onnx`: `*` any key), if the document has it."""
    path: list[Any] = []
    node = doc
    for name in key.split("."):
        part = next(iter(node)) if isinstance(node, dict) and name == "*" and node else name
        if isinstance(node, list) and part.isdigit():
            if int(part) >= len(node):
                return None
            path.append(int(part))
            node = node[int(part)]
            continue
        if not isinstance(node, dict) or part not in node:
            return None
        path.append(part)
        node = node[part]
    return tuple(path)


def apply(doc: Any, changes: list[Edit]) -> Any:
    """`doc` with `changes` made (a copy)."""
    doc = copy.deepcopy(doc)
    for edit in changes:
        path = _dotted(doc, edit.key) if edit.key else None
        if path is None:
            paths = _paths(doc)
            if not paths:
                return edit.value
            path = paths[edit.pick % len(paths)]
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if edit.drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = edit.value
    return doc


# -- bytes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteEdit:
    """Overwrite bytes at `at` (a fraction of the region mutated) with `data`, or cut the file there."""

    at: float
    data: bytes
    truncate: bool


_WORDS = st.sampled_from(
    [struct.pack("<Q", n) for n in (0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1)]
    + [struct.pack("<I", n) for n in (0, 3, 2**31, 2**32 - 1)]
)
BYTE_EDITS = st.lists(
    st.builds(
        ByteEdit,
        at=st.floats(min_value=0, max_value=1),
        data=st.one_of(st.binary(min_size=1, max_size=4), _WORDS),
        truncate=st.sampled_from([False, False, False, True]),
    ),
    min_size=1,
    max_size=4,
)


def apply_bytes(blob: bytes, changes: list[ByteEdit], region: int | None = None) -> bytes:
    """`blob` with `changes` made within its first `region` bytes (all of it by default)."""
    data = bytearray(blob)
    span = min(region or len(data), len(data))
    for edit in changes:
        at = min(int(edit.at * span), max(len(data) - 1, 0))
        if edit.truncate:
            del data[at:]
        else:
            data[at : at + len(edit.data)] = edit.data
    return bytes(data)
