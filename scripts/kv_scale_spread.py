"""How far other texts reach past the INT8 KV cache's calibrated range (the headroom of
llm2trt/optimize/kv_scales.py): per KV head and channel, each text's cached-key and value amax
over the built-in calibration text's, on one artifact.

    python scripts/kv_scale_spread.py --artifact SMOLLM2_ARTIFACT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TEXTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "text"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    args = parser.parse_args()
    from llm2trt.core.manifest import Manifest
    from llm2trt.optimize.calibrate import default_text
    from llm2trt.optimize.kv_scales import calibration_windows, kv_scales

    manifest = Manifest.read(args.artifact)
    graph = manifest.graph()
    if graph.kv_cache is None:
        print(f"{args.artifact} has no KV cache", file=sys.stderr)
        return 1
    onnx_path = manifest.onnx_path(args.artifact, graph.name)
    texts = {"built-in": default_text(), **{name: TEXTS / name for name in ("calib.txt", "eval.txt", "heldout.txt")}}
    scales = {
        name: kv_scales(onnx_path, graph, graph.kv_cache, calibration_windows(args.artifact, manifest, text, None))
        for name, text in texts.items()
    }
    base = scales["built-in"]
    print(f"{'text':<12} {'cache':<6} {'p50':>6} {'p99':>6} {'max':>6}   (amax over the built-in text's, per channel)")
    for name in list(texts)[1:]:
        for j, kind in enumerate(("key", "value")):
            ratio = np.concatenate([(scales[name][layer][j] / base[layer][j]).ravel() for layer in base])
            p50, p99, top = np.percentile(ratio, [50, 99, 100])
            print(f"{name:<12} {kind:<6} {p50:6.2f} {p99:6.2f} {top:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
