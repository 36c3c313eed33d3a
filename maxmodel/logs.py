"""Logging set up once by every command: maxmodel's own messages, not the libraries' chatter."""
from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """maxmodel's own messages at INFO; the libraries' routine chatter (absl/orbax, jax backends) hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
