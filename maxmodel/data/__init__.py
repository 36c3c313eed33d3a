"""Data: sources, tokenizers and the grain pipelines that feed the trainer."""
