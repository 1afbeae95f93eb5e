"""The lock (constraints.txt) and the package metadata agree: every dependency the metadata names, in
every extra the dev install pulls in, is pinned, and each pin lies inside the metadata's range; the
environment the tests run in is the locked one."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> dict[str, str]:
    found = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise ValueError(f"constraints.txt: {line!r} is not a pin (name==version)")
            found[canonicalize_name(name)] = version
    return found


def requirements(project: dict[str, object], extra: str = "dev") -> list[Requirement]:
    """The base dependencies and those of `extra`, its self-references (llm2trt[a,b]) followed."""
    optional: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    found = [Requirement(r) for r in project["dependencies"]]  # type: ignore[attr-defined]
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in map(Requirement, optional[name]):
            if canonicalize_name(req.name) == "llm2trt":
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def disagreements(pyproject: str, constraints: str) -> list[str]:
    locked = pins(constraints)
    wrong = []
    for req in requirements(tomllib.loads(pyproject)["project"]):
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            wrong.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name}=={version} is outside {req.specifier}")
    return wrong


def test_every_dependency_is_pinned_inside_its_range() -> None:
    assert disagreements((ROOT / "pyproject.toml").read_text(), (ROOT / "constraints.txt").read_text()) == []


def test_the_check_catches_a_pin_outside_the_range_and_a_missing_pin() -> None:
    pyproject = '[project]\ndependencies = ["onnx>=1.17", "click>=8.1"]\n[project.optional-dependencies]\ndev = []\n'
    assert disagreements(pyproject, "onnx==1.16.0\n") == ["onnx==1.16.0 is outside >=1.17", "click is not pinned"]


def test_the_installed_packages_are_the_locked_ones() -> None:
    locked = pins((ROOT / "constraints.txt").read_text())
    wrong = {}
    for name, version in locked.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if re.sub(r"\+.*", "", installed) != version:
            wrong[name] = (version, installed)
    assert wrong == {}
