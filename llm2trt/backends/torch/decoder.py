"""PyTorch as a decoder: transformers itself behind the exporter's cache interface, the reference
generate and the checks compare against."""

from __future__ import annotations

import numpy as np

from llm2trt.backends.base import DecoderContext
from llm2trt.backends.decoder import DecoderSession, open_session


def torch_decoder(ctx: DecoderContext) -> DecoderSession:
    """transformers itself, behind the exporter's own cache interface (always a growing cache)."""
    import torch

    from llm2trt.convert.export import export_module
    from llm2trt.convert.sources import source_from_info, spec_and_config
    from llm2trt.core.dtypes import to_numpy, to_torch

    spec, config = spec_and_config(ctx.manifest)
    graph = spec.graph_spec(config, ctx.manifest.dtype, spec.default_variant(kv_cache=True))
    source = source_from_info(ctx.manifest.source)
    module = export_module(source.load(ctx.manifest.dtype, ctx.manifest.attn_implementation), graph, {})

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*(to_torch(feeds[t.name]) for t in graph.inputs))
        return {t.name: to_numpy(v) for t, v in zip(graph.outputs, out, strict=True)}

    return open_session(graph, run, capacity=ctx.capacity, pad_id=ctx.pad_id, adapters=ctx.adapters)
