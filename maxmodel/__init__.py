"""maxmodel: a JAX-native, TPU-first stack for training large language models."""
__version__ = "0.1.0"
