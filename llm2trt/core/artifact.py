"""Artifact directories: staged writes, ONNX files with external data, content hashes.

Every command writes into a fresh temporary directory beside the output and renames it into place
at the end, so a failure never leaves a half-written artifact and never touches existing data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx

from llm2trt.core.errors import InputError
from llm2trt.core.manifest import DATA_NAME, MANIFEST_NAME, MODEL_NAME

logger = logging.getLogger(__name__)

# Tensors at least this large go to the external data file; small ones stay inline so shape
# inference and constant folding see them without reading the data file.
EXTERNAL_THRESHOLD = 1024
_ALIGN = 4096  # page alignment lets runtimes memory-map the weights


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output(out: Path, force: bool, reads: Iterable[Path] = ()) -> Path:
    """Fail early (before any slow work) when `out` cannot be written or would lose data."""
    out = Path(os.path.abspath(out))
    for read in reads:
        _check_apart(out, Path(os.path.abspath(read)))
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output path {out} exists and is a file")
        entries = list(out.iterdir())
        if entries and not force:
            raise InputError(f"output directory {out} exists and is not empty; pass --force to replace it")
        if entries and not (out / MANIFEST_NAME).is_file():
            raise InputError(f"refusing to replace {out}: it is not an llm2trt artifact (no {MANIFEST_NAME})")
    _probe_writable(out)
    return out


def _check_apart(out: Path, src: Path) -> None:
    """The output may be neither the input, nor inside it, nor around it (replacing it would delete it)."""
    if src == out:
        raise InputError(f"output {out} is the input; write to another directory")
    if _within(out, src):
        raise InputError(f"output {out} is inside the input {src}; write outside it")
    if _within(src, out):
        raise InputError(f"output {out} contains the input {src}; replacing it would delete the input")


def _probe_writable(out: Path) -> None:
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output directory {out} is not writable ({existing} is not a directory)")
    try:  # a real probe: permission bits do not bind root, and some filesystems refuse anyway
        os.rmdir(tempfile.mkdtemp(prefix=".llm2trt-probe-", dir=existing))
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable ({existing}: {exc.strerror or exc})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(out: Path, force: bool, reads: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `out`, on failure (an exception,
    Ctrl-C, SIGTERM) it vanishes."""
    out = check_output(out, force, reads)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        # mkdtemp makes 0700; the artifact gets what any directory the user makes would get.
        stage.chmod(0o777 & ~_umask())
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_external_candidate(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and the tensors of Constant nodes, in every (sub)graph."""
    yield from _graph_tensors(model.graph)


def save_onnx(model: onnx.ModelProto, directory: Path, name: str = MODEL_NAME) -> int:
    """Write `name` and its weights into `name`.data (one file, page-aligned); returns data bytes.

    We write the data file ourselves: onnx.save_model resolves an existing data file against the
    current directory and can append to a stale one (ENVIRONMENT.md), and a model over 2 GB cannot
    be serialized with its weights inline.
    """
    data_name = name + ".data" if name != MODEL_NAME else DATA_NAME
    data_path = directory / data_name
    if data_path.exists():
        raise FileExistsError(data_path)  # staging dirs are fresh; this is a bug, not user input
    offset = 0
    with open(data_path, "wb") as fh:
        for tensor in _tensors(model):
            if not _is_external_candidate(tensor):
                continue
            pad = (-offset) % _ALIGN
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            raw = tensor.raw_data
            fh.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(raw)
    if offset == 0:
        data_path.unlink()
    with open(directory / name, "wb") as fh:
        fh.write(model.SerializeToString())
    # Put the weights back so the caller's in-memory model stays usable.
    onnx.load_external_data_for_model(model, str(directory))
    return offset


def check_external_data(model: onnx.ModelProto, directory: Path) -> None:
    """Every external-data location a relative path to a file inside `directory` (symlinks followed),
    each weight within its file: checked from the graph and file sizes, before any weight is read."""
    root = directory.resolve()
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"weight {tensor.name!r} has its data at {location!r}"
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise InputError(f"{where}, outside the artifact {directory}: refusing to read it")
        if not (directory / location).resolve().is_relative_to(root):
            raise InputError(f"{where}, a link leading outside the artifact {directory}: refusing to read it")
        if location not in sizes:
            if not (directory / location).is_file():
                raise InputError(f"{where}, which does not exist in {directory}")
            sizes[location] = (directory / location).stat().st_size
        offset, length = info.get("offset") or "0", info.get("length") or "0"
        if not (offset.isdigit() and length.isdigit()):
            raise InputError(f"{where} with a bad offset or length ({offset!r}, {length!r})")
        end = int(offset) + int(length)
        if end > sizes[location]:
            raise InputError(f"{where}: the file is truncated ({sizes[location]} bytes; the weight ends at {end})")


def load_onnx(path: Path, with_weights: bool = True, confine: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (external data resolved next to it) with clear errors for bad files.
    `confine`: refuse external data outside the file's directory (False only for llm2trt's own
    scratch copies, whose data files link to the artifact they came from)."""
    if not path.exists():
        raise InputError(f"ONNX file does not exist: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ... on garbage
        raise InputError(f"corrupt ONNX file {path}: cannot parse it ({type(exc).__name__})") from None
    if model.ir_version == 0 or not model.graph.node or not model.opset_import:
        raise InputError(f"corrupt ONNX file {path}: not a valid ONNX model (no graph or opset)")
    if confine:
        check_external_data(model, path.parent)
    if with_weights:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # onnx raises OSError, ValueError or its C++ ValidationError
            raise InputError(f"cannot read the external weights of {path}: {str(exc).strip()[:300]}") from None
    return model


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One digest over several files, names included, in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        label = str(path.relative_to(root)) if root else path.name
        digest.update(label.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op type (`domain.Op` outside the default domain), sorted by name."""
    counts = Counter(
        (node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for node in model.graph.node
    )
    return dict(sorted(counts.items()))


def save_beside(model: onnx.ModelProto, source: Path, scratch: Path) -> Path:
    """Write `model` (a variant of the graph at `source`, loaded without weights) into `scratch`,
    its external-data files linked to the originals rather than copied."""
    scratch.mkdir(parents=True, exist_ok=True)
    for tensor in _tensors(model):
        for entry in tensor.external_data:
            target = scratch / entry.value
            if entry.key == "location" and not target.exists():
                target.symlink_to(source.parent.resolve() / entry.value)
    path = scratch / source.name
    onnx.save(model, str(path))
    return path
