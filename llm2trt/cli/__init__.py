"""The `llm2trt` command line: a thin layer that parses options into the stages' typed requests."""
