"""Pipeline parallelism's vocabulary: which layers each stage holds (the one pure function), the
names of the activations passed between stages, and the manifest's and the report's records.

A stage holds a contiguous block of the model's layers; stage 0 also the embedding, the last stage
the final norm and the logits. A stage's graph numbers its cache tensors from 0
(`past_key_values.0.key` is the first layer it holds), so its KV layout is an ordinary one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2trt.core.errors import InputError
from llm2trt.core.log import plural
from llm2trt.core.records import Record

# The activations passed from a stage to the next: graph outputs of the one (`hidden_states_out`),
# inputs of the other (`hidden_states`; a middle stage has both, and one graph cannot name two
# tensors alike). Normally the hidden state alone; where a fused op reads the residual and the
# branch apart (the gqa form's skip norms), each crossing tensor is passed, numbered after the first.
HIDDEN, HIDDEN_OUT = "hidden_states", "hidden_states_out"


def activation_name(index: int, out: bool = False) -> str:
    """The name of the `index`-th activation crossing a stage boundary, as the stage after it takes
    it (or, `out`, as the stage before it gives it)."""
    base = HIDDEN_OUT if out else HIDDEN
    return base if index == 0 else f"{base}.{index}"


def is_activation(name: str, out: bool = False) -> bool:
    base = HIDDEN_OUT if out else HIDDEN
    return name == base or (name.startswith(base + ".") and name[len(base) + 1 :].isdigit())


@dataclass(frozen=True)
class StageLayers(Record):
    """The model's layers one stage holds: `count` of them from `first`."""

    first: int
    count: int

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)

    def render(self) -> str:
        last = self.first + self.count - 1
        return f"layer {self.first}" if self.count == 1 else f"layers {self.first}-{last}"


def stage_layers(num_layers: int, pp: int) -> list[StageLayers]:
    """The layers of each of `pp` stages: equal contiguous blocks, in order. A count that does not
    divide is refused, naming the numbers."""
    if pp < 1:
        raise InputError(f"--pp must be at least 1 (got {pp})")
    if num_layers % pp:
        raise InputError(f"--pp {pp}: {plural(num_layers, 'layer')} do not divide into {pp} stages")
    per = num_layers // pp
    return [StageLayers(s * per, per) for s in range(pp)]


@dataclass(frozen=True)
class StagePlan:
    """Everything the pipeline cut needs for one stage."""

    pp: int
    stage: int
    layers: StageLayers
    num_layers: int  # the whole model's

    def __post_init__(self) -> None:
        if not 0 <= self.stage < self.pp:
            raise InputError(f"stage {self.stage} is outside pp {self.pp} (stages 0..{self.pp - 1})")

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    def stage_of(self, layer: int) -> int:
        """The stage holding model layer `layer` (stages are equal blocks)."""
        return min(layer // self.layers.count, self.pp - 1)

    @classmethod
    def stages(cls, num_layers: int, pp: int) -> list[StagePlan]:
        return [cls(pp, s, layers, num_layers) for s, layers in enumerate(stage_layers(num_layers, pp))]


@dataclass(frozen=True)
class PipelineParallel(Record):
    """The manifest's record of a pipeline-parallel artifact: at its top, `stages` names each stage's
    directory (relative) and `layers` what each holds; in a stage's own manifest, `stage` says which
    it is and `layers` holds its one block."""

    pp: int
    stage: int | None = None
    stages: list[str] = field(default_factory=list)
    layers: list[StageLayers] = field(default_factory=list)

    def render(self) -> str:
        if self.stage is not None:
            held = f" ({self.layers[0].render()})" if self.layers else ""
            return f"pp {self.pp}, stage {self.stage}{held}"
        parts = [f"{d} ({layers.render()})" for d, layers in zip(self.stages, self.layers, strict=False)]
        return f"pp {self.pp}: {', '.join(parts)}"


@dataclass(frozen=True)
class StageReport(Record):
    """What the pipeline cut did to one stage's graph."""

    stage: int
    layers: StageLayers
    counts: dict[str, int]  # kept_nodes, replicated, activations_in/out, kv_tensors, redirected reads
    fusions: dict[str, int]
    receives: list[str]  # activations from the stage before
    sends: list[str]  # activations to the stage after
    weight_bytes: int

    def render(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"stage {self.stage} ({self.layers.render()}): {counts}, {self.weight_bytes / 1e6:.1f} MB of weights"
