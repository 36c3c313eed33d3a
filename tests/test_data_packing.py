"""Packing: no token attends across documents, positions restart per document, loss mask zero on padding."""
import jax.numpy as jnp
import numpy as np
import pytest

from maxmodel.data.packing import ConcatRows, PackedRows, document_pieces, first_fit
from maxmodel.data.store import MemoryStore, default_weights
from maxmodel.data.supervised import encode_document
from maxmodel.data.tokenizer import ByteTokenizer
from maxmodel.models.attention import attention_mask

SEQ = 16
BASE = 1000  # document d holds tokens d*BASE + 0, 1, 2, ...: a token names its document and offset


def numbered_store(lengths):
    docs = [np.arange(d * BASE, d * BASE + n, dtype=np.int32) for d, n in enumerate(lengths)]
    return MemoryStore([(t, default_weights(len(t))) for t in docs])


LENGTHS = [5, 17, 3, 9, 40, 2, 12, 7, 16, 4, 30, 6]


def test_first_fit_places_items_in_the_first_row_with_room():
    assert first_fit(np.array([5, 3, 4, 2, 6, 1]), capacity=8, open_rows=64).tolist() == [0, 0, 1, 1, 2, 1]
    # With one open row, a piece that does not fit closes it (rows never reopen).
    assert first_fit(np.array([5, 4, 3]), capacity=8, open_rows=1).tolist() == [0, 1, 1]
    assert first_fit(np.array([5, 4, 3]), capacity=8, open_rows=2).tolist() == [0, 1, 0]


def test_document_pieces_cover_every_prediction_once():
    doc, start, size = document_pieces(np.array([5, 40, 17]), 16)
    assert list(zip(doc.tolist(), start.tolist(), size.tolist())) == [
        (0, 0, 4), (1, 0, 16), (1, 16, 16), (1, 32, 7), (2, 0, 16)]


@pytest.mark.parametrize("packing", ["first_fit", "none", "concat"])
def test_packed_rows_keep_documents_apart(packing):
    store = numbered_store(LENGTHS)
    rows = ConcatRows(store, SEQ) if packing == "concat" else PackedRows(store, SEQ, pad_id=-1, packing=packing)
    batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}
    mask = np.asarray(attention_mask(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["segment_ids"]),
                                     jnp.asarray(batch["positions"]), jnp.asarray(batch["positions"])))[:, 0, 0]
    inputs, targets, loss = batch["inputs"], batch["targets"], batch["loss_mask"]
    pad = batch["segment_ids"] == 0
    doc = np.where(pad, -1, inputs // BASE)
    # The mask the model receives: a real token only ever attends within its own document.
    for r in range(len(inputs)):
        allowed = mask[r]
        real = ~pad[r]
        same_doc = doc[r][:, None] == doc[r][None, :]
        assert not (allowed & real[:, None] & real[None, :] & ~same_doc).any()
        assert not (allowed & real[:, None] & pad[r][None, :]).any()  # never attends to padding
    # Positions restart at every document (piece): equal to the offset inside the piece.
    for r in range(len(inputs)):
        for s in np.unique(batch["segment_ids"][r][~pad[r]]):
            where = batch["segment_ids"][r] == s
            assert batch["positions"][r][where].tolist() == list(range(where.sum()))
            assert (np.diff(inputs[r][where]) == 1).all()  # one document's consecutive tokens
    # Loss only where the target is the next token of the same document; zero on padding.
    assert (loss[pad] == 0).all()
    np.testing.assert_array_equal(loss > 0, ~pad & (targets == inputs + 1))
    if packing != "concat":
        # Every prediction of every document appears exactly once.
        predicted = sorted(inputs[loss > 0].tolist())
        assert predicted == sorted(d * BASE + i for d, n in enumerate(LENGTHS) for i in range(n - 1))
        assert rows.efficiency == pytest.approx((loss > 0).sum() / loss.size)


def test_first_fit_packs_tighter_than_none():
    store = numbered_store(LENGTHS)
    ff, none = PackedRows(store, SEQ, 0, "first_fit"), PackedRows(store, SEQ, 0, "none")
    assert len(ff) < len(none) and ff.efficiency > none.efficiency
    assert ff.efficiency == pytest.approx(sum(n - 1 for n in LENGTHS) / (len(ff) * SEQ))


def test_supervised_loss_mask_counts_only_completions():
    tok = ByteTokenizer()
    pc = encode_document({"prompt": "Q: 2+2?", "completion": " A: 4"}, "prompt_completion", tok)
    chat = encode_document({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello!"},
                                         {"role": "user", "content": "bye"}]}, "chat", tok, "<{role}>{content}</>")
    rows = PackedRows(MemoryStore([pc, chat]), 64, tok.pad_id, "first_fit")
    row = rows[0]
    assert (row["segment_ids"] > 0).sum() == len(pc[0]) - 1 + len(chat[0]) - 1  # both in one row
    learned = row["targets"][row["loss_mask"] > 0]
    split = np.flatnonzero(learned == tok.eos_id)[0] + 1
    assert tok.decode(learned[:split]) == " A: 4"  # completion + EOS only
    assert tok.decode(learned[split:]) == "hello!</>"  # the assistant turn and its end marker
    assert learned[split - 1] == tok.eos_id and tok.eos_id not in learned[split:]
