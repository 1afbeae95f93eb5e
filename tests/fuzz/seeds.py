"""The valid inputs the fuzz targets mutate, made once per run under a scratch directory: a converted
tiny artifact, a Hugging Face directory, a GGUF file and a PEFT adapter of the same tiny Llama."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np

TINY = "tiny:llama"


def artifact(root: Path) -> Path:
    """`llm2trt convert tiny:llama`: manifest.json, model.onnx, model.onnx.data."""
    out = root / "seed-artifact"
    if not (out / "manifest.json").is_file():
        from click.testing import CliRunner

        from llm2trt.cli.main import cli

        result = CliRunner().invoke(cli, ["convert", TINY, "-o", str(out), "-q"], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
    return out


@cache
def _state_dict() -> tuple[dict[str, np.ndarray], dict[str, object]]:
    from llm2trt.convert.sources import resolve_model

    source = resolve_model(TINY)
    model = source.load()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return state, source.config.to_dict()


def hf_dir(root: Path) -> Path:
    """config.json and model.safetensors of the tiny Llama."""
    out = root / "seed-hf"
    if not (out / "model.safetensors").is_file():
        from safetensors.numpy import save_file

        state, config = _state_dict()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(out / "model.safetensors"))
    return out


def _gguf_name(name: str) -> str | None:
    parts = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in parts:
        return parts[name]
    layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    bits = name.split(".")  # model.layers.N.<module...>.weight
    if bits[:2] != ["model", "layers"]:
        return None
    module = ".".join(bits[3:-1])
    return f"blk.{bits[2]}.{layer[module]}.weight" if module in layer else None


def gguf_file(root: Path) -> Path:
    """A llama GGUF (float32 tensors, a 1000-token vocabulary) written with gguf's own GGUFWriter."""
    out = root / "seed.gguf"
    if not out.is_file():
        import gguf

        state, config = _state_dict()
        writer = gguf.GGUFWriter(str(out), "llama")
        writer.add_context_length(int(config["max_position_embeddings"]))  # type: ignore[call-overload]
        writer.add_embedding_length(int(config["hidden_size"]))  # type: ignore[call-overload]
        writer.add_block_count(int(config["num_hidden_layers"]))  # type: ignore[call-overload]
        writer.add_feed_forward_length(int(config["intermediate_size"]))  # type: ignore[call-overload]
        writer.add_head_count(int(config["num_attention_heads"]))  # type: ignore[call-overload]
        writer.add_head_count_kv(int(config["num_key_value_heads"]))  # type: ignore[call-overload]
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))  # type: ignore[arg-type]
        writer.add_rope_freq_base(10000.0)
        writer.add_vocab_size(int(config["vocab_size"]))  # type: ignore[call-overload]
        writer.add_tokenizer_model("llama")
        vocab = int(config["vocab_size"])  # type: ignore[call-overload]
        writer.add_token_list([f"<t{i}>" for i in range(vocab)])
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([1] * vocab)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        for name, value in state.items():
            target = _gguf_name(name)
            if target is not None:
                writer.add_tensor(target, value.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


ADAPTER_MODULES = ("self_attn.q_proj", "self_attn.v_proj")


def adapter(root: Path) -> Path:
    """A PEFT LoRA adapter (rank 4 on q_proj and v_proj of both layers), as PEFT writes one."""
    out = root / "seed-adapter"
    if not (out / "adapter_model.safetensors").is_file():
        from safetensors.numpy import save_file

        out.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "alpha_pattern": {},
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        rng = np.random.default_rng(0)
        tensors = {}
        for layer in range(2):
            for module in ADAPTER_MODULES:
                key = f"base_model.model.model.layers.{layer}.{module}"
                width = 64 if module.endswith("q_proj") else 32
                tensors[f"{key}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = rng.standard_normal((width, 4)).astype(np.float32)
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def fresh_copy(seed: Path, work: Path, name: str = "case") -> Path:
    """A copy of a seed (file or directory) under `work` for one example to mutate."""
    target = work / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if seed.is_dir():
        shutil.copytree(seed, target)
    else:
        shutil.copy(seed, target)
    return target
