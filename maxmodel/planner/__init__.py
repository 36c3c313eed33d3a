"""Compute planner: scaling laws, model shapes, FLOPs, memory and layout, time and cost, emitted configs.

Kept free of JAX so that `maxmodel plan` answers in well under a second; fitting (scipy) and plotting
(matplotlib) are imported only by the commands that need them.
"""
from .shape import count_params

__all__ = ["count_params"]
