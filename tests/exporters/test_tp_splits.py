"""Every linear layer of an exported decoder has a declared tensor-parallel split; tp checks refuse
what the heads cannot be split into, naming the numbers."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import transformers

from llm2trt.core.errors import InputError
from llm2trt.core.tp import Split
from llm2trt.exporters import get_spec
from llm2trt.passes.manager import Model
from llm2trt.passes.pattern import module_of
from llm2trt.passes.qdq import is_linear

# Layer 0's row-parallel pair (one all-reduce each) per architecture.
ROW_PAIRS = {
    "tiny:llama": ("self_attn.o_proj", "mlp.down_proj"),
    "tiny:qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "tiny:gemma3": ("self_attn.o_proj", "mlp.down_proj"),
    "tiny:phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "tiny:gpt2": ("attn.c_proj", "mlp.c_proj"),
    "tiny:bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
}


@pytest.mark.parametrize("name", list(ROW_PAIRS))
def test_every_linear_layer_declares_its_split(artifacts: dict[str, Path], name: str) -> None:
    spec = get_spec(name.split(":")[1])
    model = Model.from_onnx(onnx.load(str(artifacts[name] / "model.onnx")))
    modules = {module_of(n.name) for n in model.graph.nodes if is_linear(n)}
    splits = {m: spec.split_of(m) for m in modules}
    assert None not in splits.values(), splits
    rows = sorted(m for m, s in splits.items() if s is Split.ROW and (".0." in m or m.startswith("0.")))
    assert len(rows) == 2 and all(any(r.endswith(p) for r in rows) for p in ROW_PAIRS[name]), rows
    assert spec.split_of("lm_head") is Split.VOCAB


def test_tp_checks_name_the_numbers() -> None:
    llama = get_spec("llama")
    smollm2 = transformers.LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    llama.check_tp(smollm2, 3)
    with pytest.raises(InputError, match="--tp 2: 9 attention heads do not divide into 2 ranks"):
        llama.check_tp(smollm2, 2)
    tiny = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    for tp in (1, 2, 4):  # tp 4: each of the 2 KV heads replicated on two ranks
        llama.check_tp(tiny, tp)
    with pytest.raises(InputError, match="--tp 3: 4 attention heads do not divide into 3 ranks"):
        llama.check_tp(tiny, 3)
    with pytest.raises(InputError, match="--tp 2: bert declares no tensor-parallel split"):
        get_spec("bert").check_tp(None, 2)
