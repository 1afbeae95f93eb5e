"""The contract's guards themselves: what `clean` lets through and what it turns into a failure."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llm2trt.core.errors import InputError
from tests.fuzz import common


def _raise(exc: BaseException) -> None:
    raise exc


def test_a_one_line_input_error_is_a_clean_refusal() -> None:
    assert common.clean(lambda: _raise(InputError("bad file x"))) is None
    assert common.clean(lambda: 7) == 7


@pytest.mark.parametrize("exc", [KeyError("k"), ValueError("v"), InputError("two\nlines")])
def test_anything_else_fails(exc: BaseException) -> None:
    with pytest.raises((AssertionError, type(exc))):
        common.clean(lambda: _raise(exc))


def test_a_hang_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "HANG_SECONDS", 0.2)
    with pytest.raises(common.Hang):
        common.clean(lambda: time.sleep(5))


def test_a_read_outside_fails(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "inside" / "ok").write_text("y")
    with common.fenced(tmp_path, tmp_path / "inside"):
        assert common.clean((tmp_path / "inside" / "ok").read_text) == "y"
        with pytest.raises(common.ReadOutside):
            common.clean((tmp_path / "secret").read_text)
