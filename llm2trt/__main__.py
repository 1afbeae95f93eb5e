"""`python -m llm2trt`: the CLI, where the console script is not on PATH."""

from llm2trt.entry import main

main()
