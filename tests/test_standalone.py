"""The repository stands alone: no code, comment or docstring points at a file a clone does not have, or
narrates the machines the work was done on; the docs it cites exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (".py", ".sh", ".cu", ".cuh", ".h", ".toml")
# Files outside the repository, and wording that narrates where the work was done.
FORBIDDEN = re.compile(
    r"ENVIRONMENT\.md|SPEC\.md|STYLE\.md|/work/|\.\./shared|\blent\b|this workplace|these machines", re.IGNORECASE
)
CITED_DOC = re.compile(r"docs/[\w./-]+\.md")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split() if f.endswith(SOURCES) or f.startswith(".ci/")]


def offences(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        if not path.is_file() or path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
            found += [
                f"{path.relative_to(ROOT)}:{number}: no {doc}"
                for doc in CITED_DOC.findall(line)
                if not (ROOT / doc).is_file()
            ]
    return found


def test_nothing_points_outside_the_repository() -> None:
    assert offences(tracked()) == []


def test_the_check_catches_a_citation_of_a_missing_file(tmp_path: Path) -> None:
    planted = ROOT / "tests" / "data" / "_planted_standalone.py"
    planted.write_text("# measured on the lent H200 (ENVIRONMENT.md)\n# see docs/nowhere.md\n")
    try:
        assert [o.split(": ", 1)[1] for o in offences([planted])] == [
            "# measured on the lent H200 (ENVIRONMENT.md)",
            "no docs/nowhere.md",
        ]
    finally:
        planted.unlink()


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\((docs/[\w./-]+\.md)", readme))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
