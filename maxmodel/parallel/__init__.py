"""Mesh construction, logical-axis rules and the explicit-schedule parallel primitives."""
