"""Golden files: the inputs, every compared tensor and its tolerance, for CI regression checks.

A golden file is a NumPy `.npz` (a zip of `.npy` members, deflated) written tensor by tensor as a
comparison produces them, so saving never holds more than one round's tensors. `golden.json`
inside it is the index: which member is which tensor, its module and tolerance, and what produced
it. Members are numbered (ONNX names hold '/' and ':'); `np.load` reads the arrays too.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llm2trt.core.errors import InputError
from llm2trt.core.records import Record, RecordError
from llm2trt.core.tolerance import TolerancePolicy

INDEX = "golden.json"
FORMAT = 1


@dataclass(frozen=True)
class GoldenTensor(Record):
    name: str
    member: str
    kind: str  # input | mark | output
    module: str | None = None
    tolerance: TolerancePolicy | None = None
    shape: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class GoldenIndex(Record):
    format: int
    runner: str  # whose outputs these are
    graph: str
    onnx_sha256: str | None
    batch: int
    sequence: int
    seed: int
    tensors: list[GoldenTensor] = field(default_factory=list)

    def inputs(self) -> list[GoldenTensor]:
        return [t for t in self.tensors if t.kind == "input"]

    def compared(self) -> list[GoldenTensor]:
        return [t for t in self.tensors if t.kind != "input"]


class GoldenWriter:
    """Streams tensors into a golden file; the file appears only once it is complete."""

    def __init__(self, path: Path, index: GoldenIndex) -> None:
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._index = index
        self._tensors: list[GoldenTensor] = []
        try:
            self._zip = zipfile.ZipFile(self._partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1)
        except OSError as exc:
            raise InputError(f"cannot write the golden file {path}: {exc.strerror}") from None

    def add(
        self, name: str, kind: str, value: np.ndarray, module: str | None, tolerance: TolerancePolicy | None
    ) -> None:
        member = f"t{len(self._tensors)}.npy"
        with self._zip.open(member, "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, np.ascontiguousarray(value), allow_pickle=False)
        self._tensors.append(GoldenTensor(name, member, kind, module, tolerance, list(np.shape(value))))

    def close(self) -> Path:
        index = replace(self._index, tensors=self._tensors)
        self._zip.writestr(INDEX, index.to_json())
        self._zip.close()
        self._partial.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._zip.close()
        self._partial.unlink(missing_ok=True)


class Golden:
    """A golden file opened for checking; arrays are read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            self.index = GoldenIndex.from_json(self._zip.read(INDEX).decode())
        except FileNotFoundError:
            raise InputError(f"no golden file at {path}") from None
        except (zipfile.BadZipFile, KeyError, RecordError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path} is not an llm2trt golden file (save one with compare --save-golden)") from None
        if self.index.format != FORMAT:
            raise InputError(f"{path} is golden format {self.index.format}; this llm2trt reads format {FORMAT}")

    def array(self, tensor: GoldenTensor) -> np.ndarray:
        with self._zip.open(tensor.member) as handle:
            array: np.ndarray = np.lib.format.read_array(handle, allow_pickle=False)
            return array

    def feeds(self) -> dict[str, np.ndarray]:
        return {t.name: self.array(t) for t in self.index.inputs()}

    def close(self) -> None:
        self._zip.close()
