"""The original Transformer (encoder-decoder) and the seq2seq objective: packed pair rows, the model's masks
(cross-attention by segment, causal decoder, bidirectional encoder), training on the built-in corpus, config
errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmodel.config import ConfigError, load_config
from maxmodel.data.seq2seq import Seq2SeqRows
from maxmodel.data.store import MemoryStore
from maxmodel.data.supervised import encode_document
from maxmodel.data.tokenizer import load_tokenizer
from maxmodel.models.registry import build_model

TINY = ["model.name=transformer-tiny", "run.progress=false", "run.sample_tokens=0"]


def _segment(row, key, seg, seg_key="segment_ids"):
    return row[key][row[seg_key] == seg]


def test_packed_pairs_align_and_train_on_targets_only():
    tok = load_tokenizer("bytes")
    records = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "hello in French:", "completion": "bonjour"},
               {"prompt": "", "completion": "empty prompt"}, {"prompt": "x" * 40, "completion": "long"}]
    store = MemoryStore([encode_document(r, "prompt_completion", tok) for r in records])
    rows = Seq2SeqRows(store, seq_len=24, pad_id=tok.pad_id, packing="first_fit", fmt="prompt_completion")
    seen, most_pairs = set(), 0
    for i in range(len(rows)):
        row = rows[i]
        segments = sorted(set(row["segment_ids"]) - {0})
        assert segments == sorted(set(row["encoder_segment_ids"]) - {0})  # encoder k <-> decoder k
        most_pairs = max(most_pairs, len(segments))
        np.testing.assert_array_equal(row["loss_mask"], row["segment_ids"] > 0)  # every target token, nothing else
        for seg in segments:
            source = tok.decode(_segment(row, "encoder_inputs", seg, "encoder_segment_ids"))
            inputs, targets = _segment(row, "inputs", seg), _segment(row, "targets", seg)
            assert inputs[0] == tok.bos_id and targets[-1] == tok.eos_id
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # decoder inputs = targets shifted right
            np.testing.assert_array_equal(_segment(row, "positions", seg), np.arange(len(inputs)))
            record = next(r for r in records if tok.decode(targets) == r["completion"])
            assert source == record["prompt"][:23]  # cut to seq_len - 1, then EOS
            seen.add(record["completion"])
    assert seen == {r["completion"] for r in records} and most_pairs >= 2


def test_text_pairs_are_a_span_and_its_continuation():
    tok = load_tokenizer("bytes")
    text = "The quick brown fox jumps over the lazy dog, then naps."
    store = MemoryStore([encode_document(text, "text", tok)])
    rows = Seq2SeqRows(store, seq_len=16, pad_id=tok.pad_id, packing="concat", fmt="text")
    joined = ""
    for i in range(len(rows)):
        row = rows[i]
        for seg in sorted(set(row["segment_ids"]) - {0}):
            source = _segment(row, "encoder_inputs", seg, "encoder_segment_ids")
            target = _segment(row, "targets", seg)
            assert source[-1] == tok.eos_id and len(source) <= 8 and len(target) <= 8  # two pairs per row
            joined += tok.decode(source[:-1]) + tok.decode(target[:-1])
    assert joined == text  # chunks in order, each target continuing its source


def test_builtin_seq2seq_batches_resume_from_the_iterator_state(tmp_path):
    from maxmodel.data.pipeline import make_train_data
    cfg = load_config(overrides=TINY + ["data.tokenizer=bytes", "train.seq_len=32", "train.batch_size=4",
                                        f"run.output_dir={tmp_path}"])
    data = make_train_data(cfg, tmp_path)
    next(data.train)
    state = data.train.get_state()
    expected = next(data.train)
    again = make_train_data(cfg, tmp_path)
    again.train.set_state(state)
    got = next(again.train)
    assert set(got) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "encoder_inputs",
                        "encoder_segment_ids", "encoder_positions"}
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k])


@pytest.fixture(scope="module")
def forward():
    """One compiled forward of transformer-tiny: (encoder output, decoder logits), reused by the mask tests."""
    cfg = load_config(overrides=TINY + ["train.seq_len=16"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, b):
        m = nnx.merge(graphdef, params)
        memory = m.encode(b["encoder_inputs"], b["encoder_segment_ids"], b["encoder_positions"])
        logits = m(b["inputs"], b["segment_ids"], b["positions"], encoder_inputs=b["encoder_inputs"],
                   encoder_segment_ids=b["encoder_segment_ids"], encoder_positions=b["encoder_positions"])
        return memory, logits
    return lambda rows: jax.device_get(run(params, {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}))


def _two_example_row(rng):
    """Example 1: source 0..6, target 0..7; example 2: source 7..15, target 8..15."""
    enc_seg = np.array([1] * 7 + [2] * 9, np.int32)
    dec_seg = np.array([1] * 8 + [2] * 8, np.int32)
    pos = lambda s: np.concatenate([np.arange((s == k).sum()) for k in (1, 2)]).astype(np.int32)
    return {"encoder_inputs": rng.integers(3, 512, 16).astype(np.int32), "encoder_segment_ids": enc_seg,
            "encoder_positions": pos(enc_seg), "inputs": rng.integers(3, 512, 16).astype(np.int32),
            "segment_ids": dec_seg, "positions": pos(dec_seg)}


def test_masks_cross_attention_by_segment_causal_decoder_bidirectional_encoder(forward):
    base = _two_example_row(np.random.default_rng(0))
    other_source2 = dict(base, encoder_inputs=base["encoder_inputs"].copy())
    other_source2["encoder_inputs"][7:] += 1                   # example 2's source changes
    later_target = dict(base, inputs=base["inputs"].copy())
    later_target["inputs"][5] += 1                             # example 1's 6th target input changes
    later_source = dict(base, encoder_inputs=base["encoder_inputs"].copy())
    later_source["encoder_inputs"][6] += 1                     # example 1's last source token changes
    (mem, logits) = forward([base, other_source2, later_target, later_source])

    def differs(a, b):
        return np.abs(a - b).max(axis=-1) > 1e-5               # per position
    # Cross-attention stays within the example: example 1's outputs do not move, example 2's do.
    assert not differs(logits[1], logits[0])[:8].any() and differs(logits[1], logits[0])[8:].all()
    # Decoder causality: positions before the change are identical, the changed one and later ones (same
    # example) are not, and example 2 is untouched.
    d = differs(logits[2], logits[0])
    assert not d[:5].any() and d[5:8].all() and not d[8:].any()
    # The encoder attends both ways: an earlier source position sees the later token, example 2's does not.
    e = differs(mem[3], mem[0])
    assert e[:7].all() and not e[7:].any()


def test_trains_on_the_builtin_corpus_with_falling_loss(tmp_path):
    """20 steps of transformer-tiny on (span, continuation) pairs of the built-in corpus (byte tokens): the loss
    starts near ln(512) = 6.2 and the mean of the last three steps is more than 2.5 nats lower (measured: 6.20 ->
    3.32, held-out 3.55, unigram baseline 3.27); greedy decoding of a source works."""
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.loop import train
    from maxmodel.train.sample import greedy_translate
    cfg = load_config(overrides=TINY + [
        "data.tokenizer=bytes", "train.seq_len=32", "train.batch_size=8", "train.steps=20",
        "optimizer.warmup_steps=2", "optimizer.lr=1e-2", "run.log_every=1", "run.eval_every=20",
        "run.eval_batches=1", "checkpoint.enabled=false", f"run.output_dir={tmp_path}"])
    result = train(cfg)
    first, last = result.losses[1], np.mean([result.losses[s] for s in (18, 19, 20)])
    assert abs(first - np.log(512)) < 0.5 and last < first - 2.5, result.losses
    assert result.eval_loss is not None and result.eval_loss < first - 2.0
    tok = result.tokenizer
    with jax.set_mesh(result.mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, result.mesh)):
        out = greedy_translate(result.graphdef, result.params, tok.encode("The "), tok.bos_id, tok.eos_id,
                               new_tokens=8, max_len=32, mesh=result.mesh)
    assert 0 < len(out) <= 8 and all(0 <= t < 512 for t in out)


@pytest.mark.parametrize("override, key", [
    (["train.objective=seq2seq"], "train.objective"),                             # the default decoder-only model
    (["model.name=transformer-tiny", "train.objective=causal_lm"], "model.arch"),
    (["model.name=transformer-tiny", "mesh.stage=2"], "mesh.stage"),
    (["model.name=transformer-tiny", "mesh.sequence=2"], "mesh.sequence"),
    (["model.name=transformer-tiny", "data.format=chat"], "data.format"),
    (["model.name=transformer-tiny", "model.num_encoder_layers=-1"], "model.num_encoder_layers"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=override)
