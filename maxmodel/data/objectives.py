"""What `train.objective` changes in the data: BERT's masking (masked_lm) and prefix splits (prefix_lm).

masked_lm: each packed row is corrupted on the host, in the grain pipeline, by a `random_map` whose
generator grain seeds from `train.seed` and the row's index in the (shuffled, repeated) stream. So a
row's corruption is a pure function of (seed, index): the iterator state saved in checkpoints (a few
integers) restores it exactly, every process computes the same corruption as a one-process run, a row
seen again in a later epoch gets a fresh corruption (RoBERTa's dynamic masking), and the jitted step
stays objective-agnostic (it only sees inputs / targets / loss_mask). Held-out rows go through the same
map (their index in the eval set), so evaluation measures the same task.

prefix_lm: a document's prefix is its leading run of zero-weight tokens (packing.prefix_length), marked in
the `prefix_mask` batch key. With `data.format=prompt_completion` (or chat) that is BOS + the prompt
already; plain-text documents get a split point drawn uniformly per document, seeded by (seed, document).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maxmodel.config.errors import ConfigError

SELECT, TO_MASK, TO_RANDOM = 0.15, 0.8, 0.1  # BERT (Devlin et al. 2019, section 3.1); the rest stay unchanged


@dataclass(frozen=True)
class MaskedLM:
    """BERT's corruption of one packed row: 15% of the real tokens (not padding, not BOS/EOS/PAD) are
    selected; a selected token becomes the mask token with probability 0.8, a uniformly random token
    with 0.1, and stays as it is with 0.1. Targets are the original tokens; the loss counts the selected
    positions only. A picklable callable for grain's `random_map(fn(row, rng))`."""
    mask_id: int
    vocab_size: int                  # random replacements are drawn from [0, vocab_size)
    special_ids: tuple[int, ...]     # never selected

    def __call__(self, row: dict, rng: np.random.Generator) -> dict:
        tokens = np.asarray(row["inputs"], np.int32)
        n = len(tokens)
        real = (np.asarray(row["segment_ids"]) > 0) & ~np.isin(tokens, self.special_ids)
        selected = real & (rng.random(n) < SELECT)
        how = rng.random(n)
        inputs = tokens.copy()
        inputs[selected & (how < TO_MASK)] = self.mask_id
        replace = selected & (how >= TO_MASK) & (how < TO_MASK + TO_RANDOM)
        inputs[replace] = rng.integers(0, self.vocab_size, n, dtype=np.int32)[replace]
        return {**row, "inputs": inputs, "targets": tokens, "loss_mask": selected.astype(np.float32)}


def masked_lm(tokenizer) -> MaskedLM:
    """The corruption for a tokenizer; a ConfigError when it has no mask token."""
    mask_id = getattr(tokenizer, "mask_id", None)
    if mask_id is None:
        raise ConfigError("data.tokenizer", f"train.objective=masked_lm needs a mask token, and {tokenizer.id} has "
                                            f"none: use spm (trained with [MASK]), bytes, or a tokenizer file "
                                            f"with a [MASK] / <mask> token")
    specials = tuple(sorted({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, mask_id}))
    return MaskedLM(int(mask_id), int(tokenizer.vocab_size), specials)


class PrefixSplit:
    """A store whose plain-text documents get a random prefix: the first p tokens (BOS included), p drawn
    uniformly from [1, n-1] for a document of n tokens (so at least EOS is predicted), stop counting in
    the loss and become the prefix. Seeded by (seed, document index): the split never changes."""

    def __init__(self, store, seed: int):
        self.store, self.seed = store, seed
        self.lengths = store.lengths

    def __len__(self) -> int:
        return len(self.store)

    def get(self, i: int):
        tokens, weights = self.store.get(i)
        n = len(tokens)
        p = int(np.random.default_rng([self.seed, int(i)]).integers(1, n)) if n > 1 else n
        weights = np.array(weights, copy=True)
        weights[:p] = 0
        return tokens, weights
