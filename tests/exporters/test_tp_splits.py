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


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt2"])
def test_every_linear_layer_declares_its_split(artifacts: dict[str, Path], name: str) -> None:
    spec = get_spec(name.split(":")[1])
    model = Model.from_onnx(onnx.load(str(artifacts[name] / "model.onnx")))
    modules = {module_of(n.name) for n in model.graph.nodes if is_linear(n)}
    splits = {m: spec.split_of(m) for m in modules}
    assert None not in splits.values(), splits
    rows = sorted(
        m.rsplit(".", 1)[-1]
        for m, s in splits.items()
        if s is Split.ROW and m.endswith(("0.attn.c_proj", "0.mlp.c_proj", "0.self_attn.o_proj", "0.mlp.down_proj"))
    )
    assert rows in (["c_proj", "c_proj"], ["down_proj", "o_proj"])  # layer 0's row-parallel pair
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
