"""`llm2trt refit ENGINE_DIR --weights IN`: fill a weight-stripped engine from an artifact's weights.

Full TensorRT only: TensorRT-RTX fails to build stripped or refittable engines (measured,
docs/facts.md), so there is nothing to refit there and the command refuses before reading
anything. The TensorRT calls below are type-checked against `tensorrt-stubs` (scripts/typecheck.sh).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from llm2trt.core.artifact import staged_output
from llm2trt.core.errors import BackendError, InputError
from llm2trt.core.names import BUILD_NAME
from llm2trt.core.manifest import Manifest
from llm2trt.core.records import Record, RecordError
from llm2trt.core.reports import BuildInfo
from llm2trt.backends.tensorrt.adapter import load_backend


@dataclass(frozen=True)
class Refitted(Record):
    engine: str
    weights: str
    engine_bytes: int

    def render(self) -> str:
        return f"refitted {self.engine} with the weights of {self.weights} ({self.engine_bytes / 1e6:.1f} MB)"


def refit(engine_dir: Path, weights: Path, out: Path | None = None, *, force: bool = False) -> Refitted:
    load_backend().require("refit")  # before anything is read: TensorRT-RTX cannot refit
    info = _stripped_build(engine_dir)
    manifest = Manifest.read(weights)
    onnx_path = manifest.onnx_path(weights, manifest.graph().name)
    plan = refit_plan((engine_dir / info.engine).read_bytes(), onnx_path)
    done = replace(info, strip_weights=False)
    if out is None:  # in place, each file replaced whole: an interrupted refit leaves the stripped engine
        _replace_file(engine_dir / info.engine, plan)
        _replace_file(engine_dir / BUILD_NAME, done.to_json().encode())
        target = engine_dir
    else:
        with staged_output(out, force, reads=[engine_dir, weights]) as stage:
            for item in engine_dir.iterdir():
                if item.is_file() and item.name not in (info.engine, BUILD_NAME):
                    shutil.copy2(item, stage / item.name)
            (stage / info.engine).write_bytes(plan)
            done.write(stage / BUILD_NAME)
        target = out
    return Refitted(str(target / info.engine), str(weights), len(plan))


def _stripped_build(engine_dir: Path) -> BuildInfo:
    try:
        info = BuildInfo.read(engine_dir / BUILD_NAME)
    except (OSError, RecordError) as exc:
        raise InputError(f"{engine_dir} is not an engine directory made by `llm2trt build` ({exc})") from None
    if not info.strip_weights:
        raise InputError(f"{engine_dir / info.engine} holds its weights already (build it with --strip-weights)")
    return info


def _replace_file(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.refit")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def refit_plan(plan: bytes, onnx_path: Path) -> bytes:
    """The stripped plan with the ONNX file's weights put back, serialized with them."""
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine(plan)
    if engine is None:  # the stubs say it never is; TensorRT returns None when it cannot load
        raise BackendError("TensorRT could not load the engine (built by another TensorRT version or for another GPU?)")
    refitter = trt.Refitter(engine, trt_logger)
    parser = trt.OnnxParserRefitter(refitter, trt_logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise InputError(f"{onnx_path} does not fit the engine: {errors[0] if errors else 'unknown error'}")
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        raise InputError(f"{onnx_path} leaves engine weights unset: {', '.join(missing[:5])}")
    config = engine.create_serialization_config()
    config.flags &= ~(1 << int(trt.SerializationFlag.EXCLUDE_WEIGHTS))
    serialized = engine.serialize_with_config(config)
    if serialized is None:
        raise BackendError("TensorRT could not serialize the refitted engine")
    return bytes(serialized)
