"""Example seqio task over the built-in corpus: `data.source=seqio:maxmodel_builtin`.

Paragraphs of the Python documentation (train / validation split as the built-in source), tokenized with a
512-piece sentencepiece model trained on the training split (cached), EOS appended. Imported only for
`seqio:` sources (`data.seqio_module`), since it loads TensorFlow.
"""
from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from .builtin import builtin_documents, split_documents
from .tokenizer import cache_dir, train_sentencepiece

TASK = "maxmodel_builtin"
VOCAB_SIZE = 512


def _paragraphs(docs: list[str]) -> list[str]:
    return [p for d in docs for p in d.split("\n\n") if p.strip()]


def _dataset(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles the examples
    train, held_out = split_documents(builtin_documents(), 0.05)
    return tf.data.Dataset.from_tensor_slices({"text": _paragraphs(train if split == "train" else held_out)})


def register() -> None:
    if TASK in seqio.TaskRegistry.names():
        return
    train, _ = split_documents(builtin_documents(), 0.05)
    model = train_sentencepiece(train, VOCAB_SIZE, cache_dir() / "seqio" / f"builtin-{VOCAB_SIZE}.model")
    vocab = seqio.SentencePieceVocabulary(str(model))
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_dataset, splits=["train", "validation"]),
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})


register()
