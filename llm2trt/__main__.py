"""`python -m llm2trt`: the CLI, where the console script is not on PATH."""

from llm2trt.cli import main

main()
