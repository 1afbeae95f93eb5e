"""onnxruntime-genai's model builder, with transformers 5's Gemma 3 config made readable to it.

    python scripts/genai_build.py -i HF_DIR -o OUT -p fp16 -e cuda -c CACHE

onnxruntime-genai 0.18's Gemma3Model reads `config.rope_local_base_freq` (and `config.rope_theta`
for the global layers), which transformers 5 folds into `rope_parameters = {"sliding_attention":
{...}, "full_attention": {...}}` and drops from the loaded config, even when config.json names them:
the builder then fails with AttributeError (or, for `rope_theta`, silently uses its default 10,000 on
the global layers), and it reads `rope_parameters["rope_type"]` at the top level (KeyError on the
nested form; seen on an H100, 2026-12-07). This wrapper sets both thetas and a flat rope_parameters
(the global layers') on the config the builder reads first, then runs the builder's own main; the
model it loads afterwards, and other configs, pass through unchanged.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from typing import Any


def _patch() -> None:
    import transformers

    load = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        # Once: the builder's own read of the config. The model it loads afterwards gets the config
        # as transformers reads it (its Gemma 3 rotary setup needs the per-layer-type form).
        transformers.AutoConfig.from_pretrained = load
        config = load(*args, **kwargs)
        for cfg in (config, getattr(config, "text_config", None)):
            rope = getattr(cfg, "rope_parameters", None)
            if isinstance(rope, dict) and {"sliding_attention", "full_attention"} <= rope.keys():
                cfg.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
                cfg.rope_theta = rope["full_attention"]["rope_theta"]
                # The builder reads rope_parameters["rope_type"] at the top level (KeyError otherwise).
                cfg.rope_parameters = dict(rope["full_attention"])
        return config

    transformers.AutoConfig.from_pretrained = from_pretrained


def main() -> None:
    # --help is answered here (the builder's own crashes in onnxruntime-genai 0.18); every other
    # argument goes to the builder as given.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, builder_args = parser.parse_known_args()
    _patch()
    sys.argv = ["onnxruntime_genai.models.builder", *builder_args]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
