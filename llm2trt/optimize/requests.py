"""What `optimize` is asked to do, as typed requests the CLI builds from its options: light to import
(no pass, no runtime), so the CLI parses them before the stage loads anything."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llm2trt.core.errors import InputError
from llm2trt.core.kv import GQA, GROWING, KV_FORMS, KVForm, KVLayout

if TYPE_CHECKING:
    from llm2trt.core.manifest import GraphSpec
    from llm2trt.exporters import ExportSpec


@dataclass(frozen=True)
class KVRequest:
    """What `optimize` was asked to do with the KV cache (`--kv-cache`, `--kv-form`)."""

    insert: bool = False
    form: KVForm | None = None
    dtype: str | None = None  # the cache's element type where it is not the model's (`--kv-dtype int8`)

    def plan(self, spec: ExportSpec, config: Any, graph: GraphSpec) -> tuple[KVLayout | None, str]:
        """The cache layout the graph should end with (None: leave it) and the variant it becomes."""
        if self.dtype is not None and self.form != GQA:
            raise InputError(
                f"--kv-dtype {self.dtype} needs --kv-form gqa: llm2trt's CUDA attention kernels read that cache"
            )
        if not self.insert and self.form is None:
            return None, graph.name
        layout = spec.kv_layout(config)
        if layout is None:
            raise InputError(f"--kv-cache/--kv-form: {spec.name} is not a decoder; it has no KV cache")
        has = graph.kv_cache
        if self.insert and has is not None:
            raise InputError(f"--kv-cache: graph {graph.name!r} already has KV-cache I/O ({has.form} cache)")
        if not self.insert and has is None:
            raise InputError(f"--kv-form: graph {graph.name!r} has no KV cache; add --kv-cache to insert one")
        form = self.form or (has.form if has is not None else GROWING)
        # growing -> fixed -> gqa only (KV_FORMS' order): each step removes what the one before needs.
        if has is not None and KV_FORMS.index(form) < KV_FORMS.index(has.form):
            raise InputError(f"--kv-form {form}: a {has.form} cache cannot be turned into a {form} one")
        return replace(layout, form=form, dtype=self.dtype), spec.variant_for(form, config)
