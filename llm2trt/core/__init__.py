"""The foundation: what every layer above shares, importing nothing else of llm2trt.

errors (what reaches the user), dtypes (the one `DType`), records (typed, self-rendering records
and their one JSON serializer), manifest and reports (what artifacts hold), kv (KV-cache naming),
registry (name -> entry tables), numerics, artifact (staged writes, ONNX files), log.

`exporters/`, `passes/` and `plugins/` import only this package; the stages (export, optimize,
build, compare, inspect) and the CLI sit on top. tests/test_layers.py holds the line.
"""
