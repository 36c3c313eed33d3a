"""Prefix LM (UniLM, T5): each document's prefix attends to itself both ways; the loss counts the rest."""
from .base import Objective, lm_loss


def loss(model, batch, settings):
    return lm_loss(model, batch, settings, prefix=batch["prefix_mask"])


# prefix_mask: 1 on each document's prefix (packing.prefix_length)
OBJECTIVE = Objective("prefix_lm", loss, archs=("decoder",), extra_keys=("prefix_mask",))
