"""Which layers of SmolLM2-135M cost the most perplexity when quantized: the measurement behind
`--keep` choices for int8-sq and fp8 (the layers kept in high precision by measured sensitivity).

Each candidate set of modules is left in high precision and the rest fake-quantized in PyTorch
with llm2trt's own NumPy reference (`llm2trt.passes.qdq`: SmoothQuant search, weight codes,
static activation scales from PyTorch's calibration on tests/data/text/calib.txt); perplexity is
taken on the first 16 KB of tests/data/text/eval.txt. tests/passes/test_quant.py shows ONNX Runtime
on the quantized graph matches this fake quantization to 3e-7, so a candidate's figure here is the
graph's; scripts/measure_quant.py then confirms the chosen sets through `optimize` on the full text.
Run from the repository root (after scripts/setup.sh):
    python scripts/quant_sensitivity.py [--method int8-sq] [--eval-bytes 16000]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
from common import TEXT, smollm2_gguf

from llm2trt.passes import quant_math as q
from llm2trt.passes.quant_methods import METHODS, QuantMethod

Folds = list[tuple[str, str, int | None]]  # (module, parameter, axis) divided by s; axis None: a vector
# A Llama layer's linears that share one input, and where SmoothQuant folds 1/s, as the pass does.
LLAMA: list[tuple[list[str], Folds]] = [
    (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [("input_layernorm", "weight", None)]),
    (["self_attn.o_proj"], []),
    (["mlp.gate_proj", "mlp.up_proj"], [("post_attention_layernorm", "weight", None)]),
    (["mlp.down_proj"], [("mlp.up_proj", "weight", 0)]),  # nn.Linear [out, in]: its output rows
]

CANDIDATES = {  # name -> module-name fragments kept in high precision (lm_head always is)
    "none": (),
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
    "layers 0, 29": ("layers.0.", "layers.29."),
    "layers 0, 1, 29": ("layers.0.", "layers.1.", "layers.29."),
    "layers 0, 1, 28, 29": ("layers.0.", "layers.1.", "layers.28.", "layers.29."),
}


class Bench:
    """SmolLM2 in PyTorch with calibration statistics of every linear input, and a fake-quantizer."""

    def __init__(self, eval_bytes: int) -> None:
        from transformers import AutoTokenizer

        from llm2trt.convert.sources import resolve_model

        gguf = smollm2_gguf()
        self.model = resolve_model(str(gguf)).load()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.layers = int(self.model.config.num_hidden_layers)
        self.calib = self._windows(tokenizer, (TEXT / "calib.txt").read_text(), 16)
        self.eval = self._windows(tokenizer, (TEXT / "eval.txt").read_bytes()[:eval_bytes].decode(errors="ignore"), 99)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.stats = self._calibrate()

    @staticmethod
    def _windows(tokenizer: Any, text: str, count: int) -> list[list[int]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [w for w in (ids[i : i + 512] for i in range(0, len(ids), 512)) if len(w) > 1][:count]

    def _calibrate(self) -> dict[str, q.ActStats]:
        firsts = [f"model.layers.{i}.{mods[0]}" for i in range(self.layers) for mods, _ in LLAMA]
        stats = {n: q.ActStats(self.model.get_submodule(n).in_features, q.SEARCH_ROWS, k) for k, n in enumerate(firsts)}

        def hook(name: str) -> Any:
            return lambda _m, args: stats[name].update(args[0].detach().numpy())

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in firsts]
        with torch.no_grad():
            for window in self.calib:
                self.model(torch.tensor([window]))
        for handle in handles:
            handle.remove()
        return stats

    def ppl(self) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in self.eval:
                logits = self.model(torch.tensor([w])).logits[0, :-1].double()
                picked = torch.log_softmax(logits, -1)[torch.arange(len(w) - 1), torch.tensor(w[1:])]
                nll, count = nll - float(picked.sum()), count + len(w) - 1
        return math.exp(nll / count)

    def quantized_ppl(self, method: QuantMethod, keep: tuple[str, ...]) -> float:
        self.model.load_state_dict(self.state)
        hooks = []
        for i in range(self.layers):
            for mods, folds in LLAMA:
                hooks += self._quantize_group(method, i, mods, folds, keep)
        try:
            return self.ppl()
        finally:
            for h in hooks:
                h.remove()

    def _quantize_group(
        self, method: QuantMethod, layer: int, mods: list[str], folds: Folds, keep: tuple[str, ...]
    ) -> list[Any]:
        base = f"model.layers.{layer}"
        linears = [self.model.get_submodule(f"{base}.{m}") for m in mods]
        stat = self.stats[f"{base}.{mods[0]}"]
        weights = [lin.weight.detach().numpy().T.astype(np.float32) for lin in linears]
        act = method.activations
        s, clip = None, 1.0
        if act is not None and method.smooth:
            if folds:
                s, _a, clip = q.sq_search(stat.sample, stat.amax, weights, method)
            else:
                clip = q.clip_search(stat.sample, stat.amax, weights, method)
        with torch.no_grad():
            if s is not None:  # exact in high precision: applied even to kept layers, as the pass does
                migrate(self.model, base, linears, folds, s)
            if any(k in f"{base}.{mods[0]}" for k in keep):
                return []
            scale = q.activation_scale(stat.amax, s, act, clip) if act is not None else None
            return fake_quantize(linears, method, scale)


# PyTorch's side of the quantization pass, in nn.Linear terms (weight [out, in]; the pass's NumPy
# reference works on [in, out]).


def _set_weight(linear: torch.nn.Linear, w_in_out: np.ndarray) -> None:
    linear.weight.data = torch.from_numpy(np.ascontiguousarray(w_in_out.T)).to(linear.weight.dtype)


def migrate(model: torch.nn.Module, base: str, linears: list[torch.nn.Linear], folds: Folds, s: np.ndarray) -> None:
    """SmoothQuant's migration, exact in high precision: weight rows times s, 1/s folded upstream."""
    for m in linears:
        _set_weight(m, m.weight.T.detach().numpy().astype(np.float32) * s[:, None])
    for owner, attr, axis in folds:
        p = getattr(model.get_submodule(f"{base}.{owner}"), attr)
        p.data = p.data / torch.from_numpy(s).reshape((-1, 1) if axis == 0 else (-1,))


def fake_quantize(linears: list[torch.nn.Linear], method: QuantMethod, act_scale: float | None) -> list[Any]:
    """Weights through the reference's codes (per channel); the input, when a scale is given, through
    a static per-tensor Q/DQ hook. Returns the hooks."""
    for m in linears:
        _set_weight(m, q.fake_quant_weight(m.weight.T.detach().numpy(), method, 0))
    act = method.activations
    if act is None or act_scale is None:
        return []

    def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(q.fake_quant_values(args[0].numpy(), act_scale, act)),)

    return [m.register_forward_pre_hook(hook) for m in linears]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="int8-sq,fp8")
    parser.add_argument("--eval-bytes", type=int, default=16000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    bench = Bench(args.eval_bytes)
    base = bench.ppl()
    tokens = sum(len(w) - 1 for w in bench.eval)
    print(
        f"SmolLM2-135M fp32 perplexity {base:.4f} ({tokens} scored tokens; setup {time.perf_counter() - start:.0f} s)"
    )
    print(f"{'method':<8} {'kept in high precision (+ lm_head)':<36} {'ppl':>8} {'change':>8}")
    for name in args.method.split(","):
        method = METHODS.get(name)
        for label, keep in CANDIDATES.items():
            ppl = bench.quantized_ppl(method, keep)
            print(f"{name:<8} {label:<36} {ppl:>8.4f} {ppl / base - 1:>+8.2%}", flush=True)


if __name__ == "__main__":
    main()
