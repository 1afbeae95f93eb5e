"""The artifact manifest: what every stage writes and every later stage reads instead of guessing.

An artifact holds one or more graphs (`GraphSpec`: the variants an exporter spec declares, later
per-rank graphs), each with its I/O, dim ranges, KV layout and files. Every path in a manifest is
relative to the directory holding it, so artifacts move. Reading a manifest imports no exporter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm2trt import __version__
from llm2trt.core.dtypes import DType
from llm2trt.core.errors import InputError
from llm2trt.core.kv import KVLayout
from llm2trt.core.lora import AdapterRecord, LoraSlots
from llm2trt.core.names import DATA_NAME, MANIFEST_NAME, MODEL_NAME
from llm2trt.core.pp import PipelineParallel
from llm2trt.core.quant import Quantization
from llm2trt.core.records import Record, RecordError
from llm2trt.core.tp import TensorParallel

Dim = int | str


@dataclass(frozen=True)
class TensorSpec(Record):
    """One graph input or output; symbolic dims are strings shared across tensors."""

    name: str
    dtype: DType
    shape: list[Dim]

    def symbolic_dims(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]


@dataclass(frozen=True)
class DimRange(Record):
    """Range of one symbolic dim: what TensorRT optimization profiles are made from."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"invalid dim range {self.min}:{self.opt}:{self.max} (need 1 <= min <= opt <= max)")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class SourceInfo(Record):
    """Where the model came from, with a content hash so later stages can tell it changed."""

    kind: str  # tiny | hf | gguf
    location: str  # the tiny spec name, or an absolute path (the model, not part of the artifact)
    sha256: str


@dataclass(frozen=True)
class PassRecord(Record):
    """What one pass did: counts per rule (or per thing removed/folded), and whether it changed the graph."""

    name: str
    modified: bool
    counts: dict[str, int]
    seconds: float = 0.0  # written to the manifest's `timings`, apart from what must be reproducible
    stage: str = "optimize"


@dataclass(frozen=True)
class GraphSpec(Record):
    """One graph of an artifact: a variant its exporter spec declares (or a rank's graph)."""

    name: str  # the variant: logits, encoder, ...
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    main_output: str
    dims: dict[str, DimRange]  # ranges of the symbolic dims (what optimization profiles span)
    kv_cache: KVLayout | None = None
    lora: LoraSlots | None = None  # optimize --lora-slots: the adapter inputs of its low-rank paths
    onnx: str = MODEL_NAME  # relative to the manifest's directory
    external_data: list[str] = field(default_factory=lambda: [DATA_NAME])
    # sha256 of each external_data file, in the same order (empty in artifacts from before 0.1.0's
    # scale work): `build` and `inspect --verify` check them.
    external_data_sha256: list[str] = field(default_factory=list)
    engine: str | None = None
    onnx_sha256: str | None = None  # of the ONNX file an engine was built from
    op_counts: dict[str, int] = field(default_factory=dict)
    fusions: dict[str, int] = field(default_factory=dict)
    expected_fusions: dict[str, int] = field(default_factory=dict)

    def symbolic_dims(self) -> set[str]:
        """The dynamic dims of the graph inputs (what optimization profiles range over)."""
        return {d for t in self.inputs for d in t.symbolic_dims()}

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


_NAME_MAX = 255  # bytes in one path component (Linux, macOS)


def _files(graph: GraphSpec) -> list[tuple[str, str]]:
    """A graph's file names as the manifest gives them (relative to its directory)."""
    named = [("onnx", graph.onnx), *(("external_data", name) for name in graph.external_data)]
    return named + ([("engine", graph.engine)] if graph.engine is not None else [])


@dataclass(frozen=True)
class GenerationDefaults(Record):
    """What generation needs from the model: where the tokenizer is, and the special tokens."""

    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    tokenizer: str | None = None  # a directory relative to the manifest's, if the model has a tokenizer
    chat_template: bool = False


@dataclass(frozen=True)
class Manifest(Record):
    architecture: str  # the exporter spec's name: gpt2, llama, bert, vit
    model_type: str  # the config's model_type: llama, mistral, qwen2, ...
    model_class: str  # the transformers class exported, e.g. LlamaForCausalLM
    task: str
    dtype: DType
    opset: int
    source: SourceInfo
    graphs: dict[str, GraphSpec]  # in order; the first is the default
    attn_implementation: str = "sdpa"
    exporter: str = "torchscript"
    passes: list[PassRecord] = field(default_factory=list)
    # The transformers config as a dict: later stages make sample inputs from it without the weights.
    model_config: dict[str, Any] = field(default_factory=dict)
    generation: GenerationDefaults | None = None  # decoders
    quantization: Quantization | None = None  # optimize --quant
    tensor_parallel: TensorParallel | None = None  # optimize --tp: the ranks, or which rank this is
    pipeline_parallel: PipelineParallel | None = None  # optimize --pp: the stages, or which stage this is
    adapters: list[AdapterRecord] = field(default_factory=list)  # LoRA adapters merged at convert (--lora)
    llm2trt_version: str = __version__

    def __post_init__(self) -> None:
        if not self.graphs:
            raise InputError("manifest lists no graphs")

    # -- the default graph, which the contract's top-level keys describe (docs/contract.md) ----------------------------

    def graph(self, name: str | None = None) -> GraphSpec:
        if name is None:
            return next(iter(self.graphs.values()))
        if name not in self.graphs:
            raise InputError(f"artifact has no graph {name!r}; it holds {', '.join(self.graphs)}")
        return self.graphs[name]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.graph().inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.graph().outputs

    @property
    def main_output(self) -> str:
        return self.graph().main_output

    @property
    def dynamic_dims(self) -> dict[str, DimRange]:
        return self.graph().dims

    @property
    def kv_cache(self) -> KVLayout | None:
        return self.graph().kv_cache

    @property
    def fusions(self) -> dict[str, int]:
        return self.graph().fusions

    @property
    def expected_fusions(self) -> dict[str, int]:
        return self.graph().expected_fusions

    @property
    def op_counts(self) -> dict[str, int]:
        return self.graph().op_counts

    def symbolic_dims(self) -> set[str]:
        return self.graph().symbolic_dims()

    def require_whole(self, command: str) -> None:
        """Refuse a tensor- or pipeline-parallel artifact in a command that runs one graph (ONNX
        Runtime has no collectives, and a stage is not the model; the rank harness runs them)."""
        if self.tensor_parallel is not None:
            raise InputError(
                f"{command}: this artifact is tensor-parallel ({self.tensor_parallel.render()}); "
                "`llm2trt generate` runs its ranks, or give its unsplit source"
            )
        if self.pipeline_parallel is not None:
            raise InputError(
                f"{command}: this artifact is pipeline-parallel ({self.pipeline_parallel.render()}); "
                "`llm2trt generate` runs its stages, or give its unsplit source"
            )

    @property
    def split(self) -> str | None:
        """How this artifact is split over processes (tensor or pipeline parallel), or None."""
        record = self.tensor_parallel or self.pipeline_parallel
        return record.render() if record is not None else None

    def with_graph(self, graph: GraphSpec) -> Manifest:
        """A copy with `graph` replacing the graph of the same name (or added last)."""
        return replace(self, graphs={**self.graphs, graph.name: graph}, llm2trt_version=__version__)

    def with_passes(self, records: list[PassRecord]) -> Manifest:
        return replace(self, passes=[*self.passes, *records], llm2trt_version=__version__)

    def moved(self, frm: Path, to: Path) -> Manifest:
        """This manifest as written in directory `to` while its files stay in `frm`: each graph's
        paths re-expressed relative to `to` (an engine directory pointing at its ONNX)."""
        graphs = {}
        for name, g in self.graphs.items():
            rel = [os.path.relpath(frm / p, to) for p in (g.onnx, *g.external_data)]
            graphs[name] = replace(g, onnx=rel[0], external_data=rel[1:])
        generation = self.generation
        if generation is not None and generation.tokenizer is not None:
            generation = replace(generation, tokenizer=os.path.relpath(frm / generation.tokenizer, to))
        return replace(self, graphs=graphs, generation=generation)

    # -- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # Durations apart: two runs on the same input write the same manifest but for `timings`.
        for entry in data["passes"]:
            del entry["seconds"]
        data["timings"] = {"pass_seconds": [p.seconds for p in self.passes]}
        default = self.graph()
        # The contract's top-level keys (docs/contract.md): the default graph's I/O and cache, for readers of one graph.
        data.update(
            inputs=[t.to_dict() for t in default.inputs],
            outputs=[t.to_dict() for t in default.outputs],
            kv_cache=default.kv_cache.to_dict() if default.kv_cache else None,
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        passes, timings = data.get("passes"), data.get("timings")
        seconds = timings.get("pass_seconds") if isinstance(timings, Mapping) else None
        if isinstance(passes, list) and isinstance(seconds, list) and len(passes) == len(seconds):
            # (a pass that is not an object stays as it is: the record's own check names it)
            merged = [
                {**p, "seconds": s} if isinstance(p, Mapping) else p for p, s in zip(passes, seconds, strict=True)
            ]
            data = {**data, "passes": merged}
        return super().from_dict(data)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(self.to_json())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        if not directory.exists():
            raise InputError(f"artifact directory does not exist: {directory}")
        if not directory.is_dir():
            raise InputError(f"not an llm2trt artifact directory: {directory} is a file")
        if not path.is_file():
            raise InputError(f"not an llm2trt artifact: {path} is missing (make one with `llm2trt convert`)")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise RecordError(f"not a JSON object but {type(data).__name__}")
            if "graphs" not in data and "inputs" in data:
                raise InputError(
                    f"{path} was written by llm2trt {data.get('llm2trt_version', '?')}, before artifacts held "
                    "several graphs: convert the model again"
                )
            manifest = cls.from_dict(data)
            manifest._check_paths()
            return manifest
        except RecordError as exc:  # (a ValueError: first)
            raise InputError(f"manifest {path} is malformed ({exc})") from None
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
            raise InputError(f"cannot read {path}: {exc}") from None

    def _check_paths(self) -> None:
        """Every file name the manifest holds is one the filesystem can look up: not empty, no NUL
        byte, no part longer than NAME_MAX (else `is_file()` raises instead of answering)."""
        named = [(f"graph {g.name!r}'s {what}", p) for g in self.graphs.values() for what, p in _files(g)]
        if self.generation is not None and self.generation.tokenizer is not None:
            named.append(("the tokenizer", self.generation.tokenizer))
        for what, value in named:
            if not value or "\0" in value or any(len(os.fsencode(part)) > _NAME_MAX for part in Path(value).parts):
                raise RecordError(f"{what} {value[:80]!r} is not a usable file name")

    def onnx_path(self, directory: Path, graph: str | None = None) -> Path:
        """The ONNX file of a graph, resolved against the manifest's directory and checked."""
        spec = self.graph(graph)
        path = Path(os.path.normpath(directory / spec.onnx))
        if not path.is_file():
            where = f"{spec.onnx} (relative to {directory})" if spec.onnx != path.name else str(path)
            raise InputError(
                f"the ONNX file of graph {spec.name!r} is missing: {where}"
                + ("; an engine directory finds its ONNX by relative path: move them together" if spec.engine else "")
            )
        from llm2trt.core.artifact import load_onnx, sha256_files

        if spec.onnx_sha256 is not None and sha256_files([path]) != spec.onnx_sha256:
            raise InputError(f"{path} changed since the engine in {directory} was built from it")
        # A corrupt file, or weights whose location leads outside the artifact or past a file's
        # end, stop every command here, before anything reads a weight.
        load_onnx(path, with_weights=False)
        return path

    def verify_weights(self, directory: Path, graph: str | None = None) -> int:
        """Check a graph's data files against the sha256 recorded when they were written (a flipped
        byte passes every size check); the bytes checked. Reads every weight: `build` and
        `inspect --verify` ask for it, not every command."""
        from llm2trt.core.artifact import sha256_files

        spec = self.graph(graph)
        checked = 0
        for name, digest in zip(spec.external_data, spec.external_data_sha256, strict=False):
            path = Path(os.path.normpath(directory / name))
            if not path.is_file():  # missing, or a device such as /dev/zero whose hash never ends
                raise InputError(f"weights file {path} of graph {spec.name!r} is missing or not a regular file")
            try:
                actual = sha256_files([path])
            except OSError as exc:  # a file that stats as regular but cannot be read (/proc/self/mem)
                raise InputError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
            if actual != digest:
                raise InputError(
                    f"weights file {path} is corrupt: its sha256 is not the one recorded when it was written"
                )
            checked += path.stat().st_size
        return checked
