"""BERT: the encoder (bidirectional within packed documents), its masked-LM corruption, and a short training run."""
from __future__ import annotations

import base64
import json

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import ConfigError, load_config
from maxmodel.data.objectives import SELECT, TO_MASK, TO_RANDOM, MaskedLM, masked_lm
from maxmodel.data.tokenizer import TiktokenTokenizer
from maxmodel.models.registry import build_model


def _rows(n_rows=200, length=512, vocab=1000, seed=0):
    """Random rows of two packed documents (BOS ... EOS each) followed by padding (segment 0, pad id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        tokens = rng.integers(6, vocab, length).astype(np.int32)
        segments = np.zeros(length, np.int32)
        cut, end = int(rng.integers(100, 300)), int(rng.integers(400, length))
        segments[:cut], segments[cut:end] = 1, 2
        tokens[[0, cut]], tokens[[cut - 1, end - 1]] = 1, 2  # BOS, EOS
        tokens[end:] = 0
        rows.append({"inputs": tokens, "targets": np.roll(tokens, -1), "segment_ids": segments,
                     "positions": np.zeros(length, np.int32), "loss_mask": np.ones(length, np.float32)})
    return rows


def test_corruption_statistics_and_loss_positions():
    """Over ~90k real tokens: 15% selected, of those 80% [MASK] / 10% random / 10% unchanged (each within
    4 standard deviations); loss exactly on the selected positions, never on padding or BOS/EOS; the
    corruption is a function of (seed, row index)."""
    vocab, mask_id = 1000, 5
    rows = _rows(vocab=vocab)
    corrupt = MaskedLM(mask_id, vocab, (0, 1, 2, mask_id))
    ds = grain.MapDataset.source(rows).random_map(corrupt, seed=7)
    out = [ds[i] for i in range(len(rows))]
    cat = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    original = np.concatenate([r["inputs"] for r in rows])
    np.testing.assert_array_equal(cat["targets"], original)  # targets: the uncorrupted tokens
    selected = cat["loss_mask"] > 0
    real = (cat["segment_ids"] > 0) & ~np.isin(original, (0, 1, 2))
    assert not (selected & ~real).any()  # no padding, BOS or EOS is ever selected
    assert not ((cat["inputs"] != original) & ~selected).any()  # only selected positions are changed

    def within(frac, p, n):
        return abs(frac - p) < 4 * np.sqrt(p * (1 - p) / n)
    n_real, n_sel = real.sum(), selected.sum()
    assert n_real > 80_000 and within(n_sel / n_real, SELECT, n_real), n_sel / n_real
    to_mask = (cat["inputs"] == mask_id) & selected
    unchanged = (cat["inputs"] == original) & selected
    other = selected & ~to_mask & ~unchanged
    p_mask = TO_MASK + TO_RANDOM / vocab                  # a random draw may also hit [MASK] or the original
    p_same = (1 - TO_MASK - TO_RANDOM) + TO_RANDOM / vocab
    assert within(to_mask.sum() / n_sel, p_mask, n_sel), to_mask.sum() / n_sel
    assert within(unchanged.sum() / n_sel, p_same, n_sel), unchanged.sum() / n_sel
    assert within(other.sum() / n_sel, 1 - p_mask - p_same, n_sel), other.sum() / n_sel
    np.testing.assert_array_equal(ds[3]["inputs"], out[3]["inputs"])          # deterministic per index
    assert not np.array_equal(out[3]["loss_mask"], out[4]["loss_mask"])


def test_tokenizers_provide_a_mask_token_or_fail_clearly(tmp_path):
    path = tmp_path / "bytes.tiktoken"  # a tiktoken ranks file: no mask token
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*mask token"):
        masked_lm(TiktokenTokenizer(ranks_file=path))


@pytest.mark.parametrize("overrides", [["train.objective=masked_lm"],                        # decoder
                                       ["model.name=bert-tiny", "train.objective=causal_lm"],  # encoder
                                       ["model.name=bert-tiny", "train.objective=prefix_lm"]])
def test_objective_must_fit_the_architecture(overrides):
    with pytest.raises(ConfigError, match=r"train\.objective.*model\.arch"):
        load_config(overrides=overrides)


def test_encoder_is_bidirectional_within_documents_only():
    """Changing a later token changes an earlier position's output in the same document, and nothing in
    the other packed document; padding changes nothing either."""
    cfg = load_config(overrides=["model.name=bert-tiny", "train.seq_len=16"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (1, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 6 + [0] * 4])
    positions = jnp.asarray([list(range(6)) * 2 + [0] * 4])

    def out(t):
        return np.asarray(model(t, segments, positions))
    base = out(tokens)
    later = out(tokens.at[0, 5].set(7))        # last token of document 1
    assert np.abs(later[0, :5] - base[0, :5]).max() > 1e-4      # earlier positions see it
    np.testing.assert_allclose(later[0, 6:12], base[0, 6:12], atol=1e-6)  # document 2 does not
    other = out(tokens.at[0, 8].set(7))        # inside document 2
    np.testing.assert_allclose(other[0, :6], base[0, :6], atol=1e-6)
    assert np.abs(other[0, 6:8] - base[0, 6:8]).max() > 1e-4
    padded = out(tokens.at[0, 14].set(7))      # padding
    np.testing.assert_allclose(padded[0, :12], base[0, :12], atol=1e-6)


def test_bert_masked_lm_trains_on_the_builtin_corpus(tmp_path, capsys):
    """bert-tiny, masked LM on the built-in corpus (spm tokenizer with [MASK]), through the CLI: 20 steps
    take the training loss from ~ln(512) = 6.2 to at least 0.8 nat lower (measured: 6.26 -> 5.08, eval 5.04);
    the final evaluation runs on corrupted held-out rows; no greedy sample is printed for an encoder."""
    from maxmodel.cli import main
    args = ["train", "model.name=bert-tiny", "train.seq_len=128", "train.batch_size=16", "train.steps=20",
            "optimizer.warmup_steps=2", "run.log_every=1", "run.eval_every=20", "run.eval_batches=1",
            "checkpoint.enabled=false", "run.progress=false", f"run.output_dir={tmp_path}", "run.name=bert"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "sample" not in printed
    records = [json.loads(line) for line in (tmp_path / "bert" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.8, losses
    assert np.isfinite(records[-1]["eval_loss"])


def test_masked_lm_batches_from_the_pipeline(tmp_path):
    """The trainer's own batches: [MASK] appears, targets differ from inputs only under the loss mask, the
    loss never covers padding; the held-out rows are corrupted the same way; a restored iterator state
    gives the same corrupted batch."""
    from maxmodel.data.pipeline import make_train_data
    cfg = load_config(overrides=["model.name=bert-tiny", "train.seq_len=64", "train.batch_size=8",
                                 "data.packing=first_fit", f"run.output_dir={tmp_path}"])
    data = make_train_data(cfg, tmp_path)
    tok = data.tokenizer
    assert tok.mask_id is not None and tok.sp.id_to_piece(tok.mask_id) == "[MASK]"
    next(data.train)
    state = data.train.get_state()
    batch = next(data.train)
    for b in (batch, next(data.eval_batches(1))):
        sel = b["loss_mask"] > 0
        assert (b["inputs"][sel] == tok.mask_id).any() and not (b["inputs"][~sel] == tok.mask_id).any()
        assert not ((b["inputs"] != b["targets"]) & ~sel).any()
        assert not (sel & (b["segment_ids"] == 0)).any()
        assert 0.08 < sel.sum() / (b["segment_ids"] > 0).sum() < 0.22
    again = make_train_data(cfg, tmp_path)
    again.train.set_state(state)
    resumed = next(again.train)
    for k in batch:
        np.testing.assert_array_equal(resumed[k], batch[k])


@pytest.fixture(scope="module")
def bert_one_device():
    import jax
    from test_train_step import run_steps
    return run_steps(["model.name=bert-tiny", "mesh.data=1"], jax.devices()[:1])


@pytest.mark.parametrize("layout", [
    ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=ring"],  # bidirectional ring
    ["mesh.data=2", "mesh.sequence=4", "model.attention.context_parallel=allgather"],
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],  # the encoder's own parameters' logical axes
], ids=["sequence=4 ring", "sequence=4 allgather", "data=2 fsdp=2 tensor=2"])
def test_encoder_layouts_equal_one_device(layout, bert_one_device):
    """3 steps (loss, grad norm) on 8 devices equal one device's: context parallelism handles causal=False."""
    import jax
    from test_train_step import run_steps
    result = run_steps(["model.name=bert-tiny", *layout], jax.devices())
    np.testing.assert_allclose(result, bert_one_device, rtol=1e-5)
