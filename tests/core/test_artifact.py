"""Artifact files: external data written once, page-aligned, never appended; staged writes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llm2trt.core.artifact import load_onnx, save_onnx, staged_output
from llm2trt.core.errors import InputError


def _model(n: int = 3) -> onnx.ModelProto:
    weights = [numpy_helper.from_array(np.full((64, 64), i, dtype=np.float32), f"w{i}") for i in range(n)]
    small = numpy_helper.from_array(np.ones(4, dtype=np.float32), "small")
    nodes, prev = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "small"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [*weights, small],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_save_writes_one_aligned_data_file(tmp_path: Path) -> None:
    model = _model()
    written = save_onnx(model, tmp_path)
    data = tmp_path / "model.onnx.data"
    assert written.files == ["model.onnx.data"] and data.stat().st_size == written.nbytes
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    offsets = [
        int(next(e.value for e in t.external_data if e.key == "offset"))
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    ]
    assert len(offsets) == 3 and all(o % 4096 == 0 for o in offsets)
    small = next(t for t in proto.graph.initializer if t.name == "small")
    assert small.data_location == TensorProto.DEFAULT  # tiny tensors stay inline
    # The caller's model now points at the written files (it is not read back into memory).
    assert model.graph.initializer[1].data_location == TensorProto.EXTERNAL
    assert not model.graph.initializer[1].HasField("raw_data")
    loaded = load_onnx(tmp_path / "model.onnx")
    assert numpy_helper.to_array(loaded.graph.initializer[2])[0, 0] == 2.0


def test_saving_again_elsewhere_does_not_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)  # onnx.save_model would resolve a stale data file against the cwd
    size = save_onnx(model, first).nbytes
    # Saved once, the model's weights are in `first`: saving it again reads them from there.
    assert save_onnx(model, second, source=first).nbytes == size
    assert (second / "model.onnx.data").stat().st_size == (first / "model.onnx.data").stat().st_size


def test_big_weights_go_into_several_aligned_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llm2trt.core.artifact.SHARD_BYTES", 40_000)  # two 16 KB weights per file
    written = save_onnx(_model(5), tmp_path)
    assert written.files == ["model.onnx.data", "model.onnx.1.data", "model.onnx.2.data"]
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    where = [{e.key: e.value for e in t.external_data} for t in proto.graph.initializer if t.external_data]
    assert [w["location"] for w in where] == ["model.onnx.data"] * 2 + ["model.onnx.1.data"] * 2 + ["model.onnx.2.data"]
    assert all(int(w["offset"]) % 4096 == 0 for w in where)
    loaded = load_onnx(tmp_path / "model.onnx")
    assert [float(numpy_helper.to_array(t)[0, 0]) for t in loaded.graph.initializer[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_unchanged_weights_are_cloned_and_changed_ones_written_new(tmp_path: Path) -> None:
    from llm2trt.passes.manager import FileValues, Model

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    save_onnx(_model(4), first)
    model = Model.from_onnx(load_onnx(first / "model.onnx", with_weights=False), weights_dir=first)
    weights = {t.name: t for t in model.graph.tensors().values() if isinstance(getattr(t, "_values", None), FileValues)}
    assert sorted(weights) == ["w0", "w1", "w2", "w3"]  # on disk, not read
    weights["w3"].values = weights["w3"].values * 10  # one pass changes one weight
    written = save_onnx(model.to_onnx(), second, source=first)
    # The input file is still 3/4 read: cloned whole (same bytes); the changed weight goes to a new file.
    assert written.files == ["model.onnx.data", "model.onnx.1.data"]
    assert (second / "model.onnx.data").read_bytes() == (first / "model.onnx.data").read_bytes()
    assert (second / "model.onnx.1.data").stat().st_size == 64 * 64 * 4
    loaded = load_onnx(second / "model.onnx")
    values = {t.name: float(numpy_helper.to_array(t)[0, 0]) for t in loaded.graph.initializer if t.name.startswith("w")}
    assert values == {"w0": 0.0, "w1": 1.0, "w2": 2.0, "w3": 30.0}


def test_staged_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out, force=False) as stage:
        (stage / "half-written").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out, force=False) as stage:
        (stage / "manifest.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("prefix", [".out.tmp-", ".llm2trt-probe-"])
def test_a_signal_as_a_scratch_directory_appears_leaves_nothing(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C the instant mkdtemp has made the staging directory, or the writability probe before
    it (what a user, or tests/test_interrupt.py polling for it, can do): it goes with the run."""
    import signal
    import tempfile
    import threading

    made = tempfile.mkdtemp

    def mkdtemp_then_interrupted(*args: Any, **kwargs: Any) -> str:
        path = made(*args, **kwargs)
        if kwargs.get("prefix") == prefix:
            # To this thread, so it is taken at once: a signal to the process may be taken by
            # another thread, and Python runs the handler in this one a little later.
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_interrupted)
    # Ctrl-C raises here as in the CLI (llm2trt/entry.py installs its handler): a job started in the
    # background (`cmd &`, as CI may start the suite) inherits SIGINT ignored, and Python keeps that.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), staged_output(tmp_path / "out", force=False):
            pytest.fail("the body ran")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_a_second_signal_during_the_cleanup_still_removes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run failing (or stopped) with a large staging directory is removing it when a second Ctrl-C
    comes: the removal finishes, then the signal is raised."""
    import signal
    import threading

    removed: list[bool] = []
    rmtree = shutil.rmtree

    def interrupted_midway(path: Any, *args: Any, **kwargs: Any) -> None:
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # taken at the next bytecode
        rmtree(path, *args, **kwargs)
        removed.append(True)

    monkeypatch.setattr(shutil, "rmtree", interrupted_midway)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), staged_output(tmp_path / "out", force=False) as stage:
            for i in range(50):
                (stage / f"part-{i}").write_bytes(b"x" * 1000)
            raise RuntimeError("the run failed")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert removed == [True]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_load_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="corrupt ONNX file"):
        load_onnx(bad)
    (tmp_path / "x").mkdir()
    save_onnx(_model(), tmp_path / "x")
    (tmp_path / "x" / "model.onnx.data").unlink()
    with pytest.raises(InputError, match=r"has its data at 'model\.onnx\.data', which does not exist"):
        load_onnx(tmp_path / "x" / "model.onnx")


def test_nested_outputs_are_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import assert_clean_failure, run_cli

    src = tmp_path / "llama"
    shutil.copytree(artifacts["tiny:llama"], src)
    inside = src / "sub"
    assert_clean_failure(run_cli("optimize", src, "-o", inside, "--no-check"), "is inside the input", inside)
    # An output around the input would delete the input when --force replaces it.
    nested = src / "deeper"
    shutil.copytree(artifacts["tiny:llama"], nested)
    result = run_cli("optimize", nested, "-o", src, "--force", "--no-check")
    assert_clean_failure(result, "contains the input", None)
    assert (nested / "model.onnx").is_file() and (src / "manifest.json").is_file()


def test_artifact_directories_get_the_usual_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out", force=False) as stage:
            (stage / "manifest.json").write_text("{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # drwxr-xr-x, not mkdtemp's 0700


def test_staging_left_by_a_killed_run_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL leaves a run no way to remove its staging directory: the next run writing the same
    output removes it once its process is gone, and never one whose process still runs."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from llm2trt.core.artifact import staged_output\n"
            "with staged_output(Path(sys.argv[1]), force=False) as stage:\n"
            "    (stage / 'half-written').write_text('x')\n"
            "    print(stage, flush=True)\n"
            "    time.sleep(600)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout is not None
    stale = Path(killed.stdout.readline().strip())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert stale.is_dir() and stale.name.startswith(".out.tmp-") and stale.name.endswith(f"-pid{killed.pid}")
    # A staging directory named for a process that still runs (this one's child) stays.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / stale.name.replace(f"pid{killed.pid}", f"pid{alive.pid}")
        live.mkdir()
        unrelated = tmp_path / f".other.tmp-abcdefgh-pid{killed.pid}"  # another output's
        unrelated.mkdir()
        with staged_output(out, force=False) as stage:
            (stage / "manifest.json").write_text("{}")
        assert not stale.exists()
        assert live.is_dir() and unrelated.is_dir()
        assert (out / "manifest.json").is_file()
    finally:
        alive.kill()
        alive.wait()
