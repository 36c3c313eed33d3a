"""Evaluation: the lm-eval backend, native tasks, autoraters, evaluation during training, reports."""
