"""Hugging Face interop: config translation and streaming safetensors conversion (extra `interop`)."""
