import numpy as np
from conftest import TINY

from maxmodel.config import load_config
from maxmodel.data.builtin import builtin_documents, split_documents
from maxmodel.data.pipeline import make_train_data
from maxmodel.data.windows import WindowSource, positions_from_segments, token_stream


def test_windows_mark_documents():
    tokens, doc_ids = token_stream([[5, 6, 7], [8, 9], [10, 11, 12, 13]], bos_id=1, eos_id=2)
    assert tokens.tolist() == [1, 5, 6, 7, 2, 1, 8, 9, 2, 1, 10, 11, 12, 13, 2]
    w = WindowSource(tokens, doc_ids, seq_len=7)[0]  # tokens 0..7
    assert w["inputs"].tolist() == [1, 5, 6, 7, 2, 1, 8]
    assert w["targets"].tolist() == [5, 6, 7, 2, 1, 8, 9]
    assert w["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert w["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    # The EOS of document 1 must not be trained to predict the BOS of document 2.
    assert w["loss_mask"].tolist() == [1, 1, 1, 1, 0, 1, 1]
    assert positions_from_segments(np.array([3, 3, 4, 4, 4, 5])).tolist() == [0, 1, 0, 1, 2, 0]


def test_builtin_split_is_disjoint_and_about_five_percent():
    docs = builtin_documents()
    train, held_out = split_documents(docs, 0.05)
    assert len(train) + len(held_out) == len(docs) and not set(train) & set(held_out)
    share = sum(map(len, held_out)) / sum(map(len, docs))
    assert 0.02 < share < 0.10


def test_pipeline_resume_and_process_sharding(tmp_path):
    cfg = load_config(overrides=TINY + ["data.source=builtin", "model.vocab_size=512", "train.steps=50"])
    a = make_train_data(cfg, tmp_path)
    first = [next(a.train) for _ in range(3)]
    state = a.train.get_state()
    expected = next(a.train)
    b = make_train_data(cfg, tmp_path)
    b.train.set_state(state)
    np.testing.assert_array_equal(next(b.train)["inputs"], expected["inputs"])
    # Two processes read disjoint halves whose union is the single-process global batch.
    p0, p1 = make_train_data(cfg, tmp_path, 0, 2), make_train_data(cfg, tmp_path, 1, 2)
    rows = np.concatenate([next(p0.train)["inputs"], next(p1.train)["inputs"]])
    assert sorted(map(bytes, rows)) == sorted(map(bytes, first[0]["inputs"]))
    assert a.stats["unigram_eval_loss"] > 4.0
    text = "def f(x):\n    return x"
    assert a.tokenizer.decode(a.tokenizer.encode(text)) == text
