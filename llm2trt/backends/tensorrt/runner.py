"""TensorRT's runner: Polygraphy's TrtRunner over the built engine (needs a GPU that runs it)."""

from __future__ import annotations

from polygraphy.backend.base import BaseRunner

from llm2trt.backends.base import RunnerContext


def trt_runner(ctx: RunnerContext, backend_name: str = "auto") -> BaseRunner:
    """Polygraphy's TensorRT runner over the engine (needs a GPU that can run it)."""
    from llm2trt.backends.tensorrt.adapter import engine_to_run

    backend, engine = engine_to_run(ctx.artifact, ctx.graph.engine, "compare", backend_name)
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = backend.is_rtx
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="trt")
