"""TensorRT's tap: Polygraphy's loaders build an engine with the marks as network outputs
(`ModifyNetworkOutputs`) for the feeds' shapes and run it once; needs a GPU that runs engines."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm2trt.backends.base import Mark, RunnerContext, Stream, Tap
from llm2trt.core.errors import BackendError


class TrtTap(Tap):
    """An engine with the marks as outputs, built for the feeds' shapes by Polygraphy's loaders."""

    def __init__(self, ctx: RunnerContext) -> None:
        from llm2trt.backends.tensorrt.adapter import load_backend

        self._backend = load_backend()
        reason = self._backend.cannot_run_engines()
        if reason:
            raise BackendError(f"cannot run marked {self._backend.display} engines here: {reason}")
        self._ctx = ctx

    def stream(self, feeds: dict[str, np.ndarray], marks: Sequence[Mark]) -> Stream:
        from polygraphy import config as polygraphy_config

        polygraphy_config.USE_TENSORRT_RTX = self._backend.is_rtx
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            ModifyNetworkOutputs,
            NetworkFromOnnxPath,
            Profile,
            TrtRunner,
        )

        profile = Profile()
        for name, value in feeds.items():
            profile.add(name, value.shape, value.shape, value.shape)
        outputs = [t.name for t in self._ctx.graph.outputs] + [m.tensor for m in marks if not m.graph_output]
        network = ModifyNetworkOutputs(NetworkFromOnnxPath(str(self._ctx.onnx_path())), outputs=outputs)
        # An engine hands back all its outputs at once: TensorRT holds every mark for one run.
        with TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))) as runner:
            out = runner.infer(feeds)
        for m in marks:
            if m.tensor in out:
                yield m.tensor, [np.asarray(out[m.tensor])]
