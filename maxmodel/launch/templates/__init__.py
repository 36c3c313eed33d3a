"""Templates rendered by `maxmodel launch` (a package so that setuptools ships them as package data)."""
