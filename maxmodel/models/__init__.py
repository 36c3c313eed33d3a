"""Flax NNX model code. It names logical axes only; maxmodel/parallel maps them to the mesh."""
