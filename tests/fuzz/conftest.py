"""The fuzz targets' scratch root (seeds are made under it once per session, per xdist worker), and
the counts scripts/fuzz.py reads (LLM2TRT_FUZZ_STATS: a JSON file written when the session ends)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fuzz import common


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = os.environ.get("LLM2TRT_FUZZ_WORK")  # scripts/fuzz.py: seeds kept across its runs
    if work:
        Path(work).mkdir(parents=True, exist_ok=True)
        return Path(work)
    return tmp_path_factory.mktemp("fuzz")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stats = os.environ.get("LLM2TRT_FUZZ_STATS")
    if stats:
        Path(stats).write_text(json.dumps(dict(common.OUTCOMES)))
