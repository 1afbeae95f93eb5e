"""Artifact directories: staged writes, ONNX files with external data, content hashes.

Every command writes into a fresh temporary directory beside the output and renames it into place
at the end, so a failure never leaves a half-written artifact and never touches existing data.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx

from llm2trt.core.errors import InputError
from llm2trt.core.names import DATA_NAME, MANIFEST_NAME, MODEL_NAME

logger = logging.getLogger(__name__)

# Tensors at least this large go to the external data file; small ones stay inline so shape
# inference and constant folding see them without reading the data file.
EXTERNAL_THRESHOLD = 1024
_ALIGN = 4096  # page alignment lets runtimes memory-map the weights
_FICLONE = 0x40049409  # linux/fs.h: share a file's extents (btrfs, xfs)
_CHUNK = 1 << 24


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
        with _signals_held():
            os.rmdir(tempfile.mkdtemp(prefix=".llm2trt-probe-", dir=existing))
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable ({existing}: {exc.strerror or exc})") from None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait (their handlers run on leaving) while a directory is made and handed
    to what removes it: a signal landing between mkdtemp and that (one sent as soon as the
    directory appears) would leave it behind. Handlers, not the signal mask: any thread may take
    a process's signal, and Python runs the handler in the main thread whatever its mask."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only, and only it may replace them
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in _HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)  # the handler it was meant for runs now


_HELD = (signal.SIGINT, signal.SIGTERM)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` for the whole run: a second run writing the same output fails
    at once instead of racing the first to the final rename (the kernel drops the lock if we die)."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"another llm2trt run (pid {holder}) is writing {out}; wait for it or write elsewhere"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder before us removed it between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def staged_output(out: Path, force: bool, reads: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `out`, on failure (an exception,
    Ctrl-C, SIGTERM) it vanishes. One run at a time per output (`_output_lock`)."""
    out = check_output(out, force, reads)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
    with _output_lock(out):
        out = check_output(out, force, reads)  # again, under the lock: another run may have finished
        _remove_stale(out)
        with _stage(out) as stage:
            yield stage


def _owner_suffix() -> str:
    """Ends each scratch directory's name: the process that made it, so a later run can tell one a
    killed run left (SIGKILL runs no cleanup) from one still in use."""
    return f"-pid{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove the staging (`.OUT.tmp-*`) and replaced (`.OUT.old-*`) directories of `out` whose process
    is gone. Called under `out`'s lock: no live run of ours can be writing them, and the pid check
    keeps a directory of any process still running. An `.old-` one goes only once `out` exists: a
    run killed between its two renames leaves the previous artifact there and nowhere else."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[A-Za-z0-9_]+-pid(\d+)")
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match[2])) or (match[1] == "old" and not out.exists()):
            continue
        logger.info("removing %s, left by a run that did not finish (pid %s)", entry, match[2])
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _stage(out: Path) -> Iterator[Path]:
    stage: Path | None = None
    try:
        with _signals_held():  # leaving it, a held signal lands inside this `try`
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", suffix=_owner_suffix(), dir=out.parent))
            except OSError as exc:
                raise InputError(f"output directory {out} is not writable ({exc.strerror or exc})") from None
        # mkdtemp makes 0700; the artifact gets what any directory the user makes would get.
        stage.chmod(0o777 & ~_umask())
        yield stage
    except BaseException:
        if stage is not None:
            # A second Ctrl-C or SIGTERM waits for the removal: raised inside rmtree, it would leave
            # the rest of a large staging directory behind (a 7B split takes seconds to remove).
            with _signals_held():
                shutil.rmtree(stage, ignore_errors=True)
        raise
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", suffix=_owner_suffix(), dir=out.parent))
        os.rmdir(old)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


SHARD_BYTES = 1 << 30  # new weights go into files of about this size: several files for big models
REUSE_FRACTION = 0.5  # an input data file the output still reads this much of is cloned, not rewritten


@dataclass(frozen=True)
class Written:
    """What `save_onnx` wrote: the ONNX file's data files (relative names, in order) and their bytes."""

    files: list[str]
    nbytes: int
    sha256: list[str]  # of each file, in order


@dataclass(frozen=True)
class _Span:
    """Where a weight's bytes are now: a file (offset, length) or the tensor's own raw_data."""

    tensor: onnx.TensorProto
    path: Path | None
    offset: int
    length: int


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external-data entries (location, offset, length) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def _spans(model: onnx.ModelProto, source: Path | None) -> list[_Span]:
    """Every weight to write, in graph order: inline bytes, or external data under `source`."""
    spans: list[_Span] = []
    for tensor in _tensors(model):
        if tensor.HasField("raw_data"):
            # onnx-graphsurgeon keeps EXTERNAL on a weight a pass read and replaced: the bytes are inline now.
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            if len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                spans.append(_Span(tensor, None, 0, len(tensor.raw_data)))
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            if source is None:  # a graph loaded without weights must say where they are
                raise ValueError(f"weight {tensor.name!r} is external but no source directory was given")
            info = external_info(tensor)
            path, offset = source / info["location"], int(info.get("offset") or 0)
            length = int(info.get("length") or 0) or path.stat().st_size - offset  # no length: to the end
            spans.append(_Span(tensor, path, offset, length))
    return spans


def point_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` an external-data tensor at (location, offset, length), its inline bytes dropped."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _clone(src: Path, dst: Path) -> None:
    """Copy a file without reading it into this process: a copy-on-write clone where the filesystem
    has them, else the kernel's copy (never a hard link: editing one artifact must not edit another)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _copy_range(fin: BinaryIO, fout: BinaryIO, offset: int, length: int) -> None:
    """`length` bytes of `fin` from `offset` appended to `fout`, in the kernel where it can."""
    fout.flush()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), length - done, offset + done)
            if n == 0:
                raise OSError(f"{fin.name} ends before byte {offset + length}")
            done += n
        fout.seek(0, os.SEEK_END)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) or done:
            raise
    fin.seek(offset)
    while done < length:
        chunk = fin.read(min(_CHUNK, length - done))
        if not chunk:
            raise OSError(f"{fin.name} ends before byte {offset + length}")
        fout.write(chunk)
        done += len(chunk)


class _Shards:
    """New data files, named after the ONNX file, each weight page-aligned, a new file past SHARD_BYTES."""

    def __init__(self, directory: Path, name: str, taken: set[str]) -> None:
        self.directory, self.name, self.taken = directory, name, set(taken)
        self.files: list[str] = []
        self.fh: BinaryIO | None = None
        self.offset = 0

    def _next_name(self) -> str:
        base = DATA_NAME if self.name == MODEL_NAME else f"{self.name}.data"
        k = 0
        while (candidate := base if k == 0 else f"{self.name}.{k}.data") in self.taken:
            k += 1
        self.taken.add(candidate)
        return candidate

    def place(self, length: int) -> tuple[BinaryIO, str, int]:
        """The open file, its name and the aligned offset where a weight of `length` bytes goes."""
        if self.fh is None or (self.offset and self.offset + length > SHARD_BYTES):
            self.close()
            self.files.append(self._next_name())
            self.fh = open(self.directory / self.files[-1], "xb")  # noqa: SIM115 (closed in close())
            self.offset = 0
        pad = (-self.offset) % _ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        return self.fh, self.files[-1], self.offset

    def advance(self, length: int) -> None:
        self.offset += length

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _clone_inputs(spans: list[_Span], directory: Path, source: Path) -> dict[Path, str]:
    """Clone into `directory` each data file of `source` the graph still reads at least REUSE_FRACTION
    of (a pass's scratch files elsewhere are copied from, never cloned)."""
    used: dict[Path, int] = {}
    for span in spans:
        if span.path is not None and span.path.parent == source:
            used[span.path] = used.get(span.path, 0) + span.length
    cloned: dict[Path, str] = {}
    for path, nbytes in used.items():
        if nbytes >= REUSE_FRACTION * path.stat().st_size and path.name not in cloned.values():
            if (directory / path.name).exists():
                raise FileExistsError(directory / path.name)  # staging dirs are fresh: a bug, not input
            _clone(path, directory / path.name)
            cloned[path] = path.name
    return cloned


def save_onnx(
    model: onnx.ModelProto, directory: Path, name: str = MODEL_NAME, source: Path | None = None, clone: bool = True
) -> Written:
    """Write `name` and its weights (external data, page-aligned, in files of about SHARD_BYTES).

    Weights come from the tensors' raw_data or, for a graph loaded without its weights, from the
    external data under `source`. An input data file the graph still reads mostly is cloned whole
    (same name, same offsets) unless `clone` is False; every other weight is copied file to file, never through a buffer
    the size of the model. The tensors end up pointing at the written files; `model` is not
    reloaded (callers that need the values read them from disk).

    We write the data files ourselves: onnx.save_model resolves an existing data file against the
    current directory and can append to a stale one (docs/facts.md), and a model over 2 GB cannot
    be serialized with its weights inline.
    """
    spans = _spans(model, source)
    cloned = _clone_inputs(spans, directory, source) if clone and source is not None else {}
    shards = _Shards(directory, name, set(cloned.values()))
    handles: dict[Path, BinaryIO] = {}
    try:
        for span in spans:
            if span.path in cloned:
                point_external(span.tensor, cloned[span.path], span.offset, span.length)
                continue
            fh, location, offset = shards.place(span.length)
            if span.path is None:
                fh.write(span.tensor.raw_data)
            else:
                if span.path not in handles:
                    handles[span.path] = open(span.path, "rb")  # noqa: SIM115 (closed below)
                _copy_range(handles[span.path], fh, span.offset, span.length)
            shards.advance(span.length)
            point_external(span.tensor, location, offset, span.length)
    finally:
        shards.close()
        for handle in handles.values():
            handle.close()
    with open(directory / name, "wb") as out:
        out.write(model.SerializeToString())
    files = [*sorted(set(cloned.values())), *shards.files]
    digests = [sha256_files([directory / f]) for f in files]
    return Written(files, sum((directory / f).stat().st_size for f in files), digests)


def check_external_data(model: onnx.ModelProto, directory: Path) -> None:
    """Every external-data location a relative path to a file inside `directory` (symlinks followed),
    each weight within its file: checked from the graph and file sizes, before any weight is read."""
    root = directory.resolve()
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        location = info.get("location", "")
        where = f"weight {tensor.name!r} has its data at {location!r}"
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise InputError(f"{where}, outside the artifact {directory}: refusing to read it")
        try:  # a NUL byte or an over-long name: the lookup itself fails
            if not (directory / location).resolve().is_relative_to(root):
                raise InputError(f"{where}, a link leading outside the artifact {directory}: refusing to read it")
            if location not in sizes:
                if not (directory / location).is_file():
                    raise InputError(f"{where}, which does not exist in {directory}")
                sizes[location] = (directory / location).stat().st_size
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise InputError(f"{where[:200]}, which cannot be looked up ({reason})") from None
        offset, length = info.get("offset") or "0", info.get("length") or "0"
        if not (_byte_count(offset) and _byte_count(length)):
            raise InputError(f"{where} with a bad offset or length ({offset!r}, {length!r})")
        end = int(offset) + int(length)
        if end > sizes[location]:
            raise InputError(f"{where}: the file is truncated ({sizes[location]} bytes; the weight ends at {end})")


def _byte_count(text: str) -> bool:
    """A decimal count of bytes int() reads: ASCII digits (isdigit() alone takes "²"), 18 at most."""
    return text.isascii() and text.isdigit() and len(text) <= 18


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
