"""compare and debug: outputs and marked intermediates across backends, goldens, bisect."""
