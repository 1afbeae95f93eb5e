"""generate and eval: text and perplexity from a decoder artifact through a backend's decoder session."""
