"""inspect: what an artifact or engine directory holds, read from its manifest and graph."""
