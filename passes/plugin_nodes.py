"""`optimize --plugin NAME`: rewrite a plugin's pattern into its `llm2trt` op and give the graph the
op's local function (the reference body ONNX Runtime runs and TensorRT inlines without the plugin)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import onnx
import onnx_graphsurgeon as gs

from llm2trt.core.errors import InputError
from llm2trt.passes.manager import Model, PassResult
from llm2trt.passes.pattern import RewritePass, RewriteRule


class PluginRewrite(Protocol):
    """What this pass needs of a plugin (`llm2trt.plugins.PluginSpec` is one; plugins sit above
    passes, so the optimize stage hands them in through the pipeline's data)."""

    @property
    def name(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def matches(self) -> str: ...
    @property
    def rules(self) -> Callable[[], list[RewriteRule]] | None: ...
    @property
    def function(self) -> Callable[[int], gs.Function] | None: ...


class PluginPass(RewritePass):
    """The plugin's rules; where they fired, its function and its domain's opset import."""

    runs_after = ("quantize", "kv_cache")  # it rewrites what quantization wrote

    def __init__(self, spec: PluginRewrite) -> None:
        if spec.rules is None or spec.function is None:
            raise InputError(f"plugin {spec.name!r} has no rewrite for optimize --plugin")
        super().__init__(f"plugin_{spec.name.lower()}", spec.rules())
        self.spec = spec
        self.make_function = spec.function

    def run(self, model: Model) -> PassResult:
        result = super().run(model)
        if not result.modified:
            reasons = sorted({r.reason for r in result.refusals})
            raise InputError(
                f"--plugin {self.spec.name}: nothing in the graph matches its pattern"
                + (f" ({reasons[0]})" if reasons else f": it rewrites {self.spec.matches}")
            )
        graph = model.graph
        if not any(f.name == self.spec.name and f.domain == self.spec.domain for f in graph.functions):
            graph.functions.append(self.make_function(model.opset))
        domains = list(graph.import_domains or [])
        if not any(d.domain == self.spec.domain for d in domains):
            domains.append(onnx.helper.make_opsetid(self.spec.domain, self.spec.version))
            if not any(d.domain in ("", "ai.onnx") for d in domains):
                domains.append(onnx.helper.make_opsetid("", model.opset))
            graph.import_domains = domains
        return result
