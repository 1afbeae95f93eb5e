"""TensorRT-RTX alone: parse an ONNX file and build it with the optimization profiles an llm2trt
build recorded (build.json), nothing else imported. `scripts/bench_scale.py` runs it as the floor
the `build` stage's memory is held to (the target: build <= 1.1x of this).

    python scripts/trt_floor.py FUSED/model.onnx ENGINE_DIR/build.json [--engine OUT.engine]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("build_json", type=Path)
    parser.add_argument("--engine", type=Path, default=None)
    opts = parser.parse_args()
    import tensorrt_rtx as trt

    record = json.loads(opts.build_json.read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    onnx_parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    if not onnx_parser.parse_from_file(str(opts.onnx)):
        errors = [str(onnx_parser.get_error(i)) for i in range(onnx_parser.num_errors)]
        raise SystemExit(f"parse failed: {errors[:3]}")
    parsed = time.perf_counter() - start
    for i in range(network.num_layers):  # as llm2trt builds by default: attention without a kernel decomposes
        layer = network.get_layer(i)
        kinds = {
            trt.LayerType.ATTENTION_INPUT: trt.IAttentionInputLayer,
            trt.LayerType.ATTENTION_OUTPUT: trt.IAttentionOutputLayer,
        }
        if layer.type in kinds:
            layer.__class__ = kinds[layer.type]
            if layer.attention is not None:
                layer.attention.decomposable = True
    config = builder.create_builder_config()
    cc = record["compute_capability"]  # "sm89"
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc[2:]}"), 0)
    for shapes in record["optimization_profiles"]:
        profile = builder.create_optimization_profile()
        for name, rng in shapes.items():
            profile.set_shape(name, rng["min"], rng["opt"], rng["max"])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit("build failed")
    if opts.engine is not None:
        opts.engine.write_bytes(memoryview(plan))
    took = time.perf_counter() - start
    print(f"{network.num_layers} layers, {plan.nbytes} bytes, parse {parsed:.1f} s, total {took:.1f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
