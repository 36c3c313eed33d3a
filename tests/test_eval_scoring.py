"""The packed scorer: many sequences per forward pass equal each scored alone and the plain forward pass
(1e-5), on 8 emulated devices (rows over data x fsdp); rolling-window perplexity equals the training loss
(the train step's own eval function) on the same windows; prompts and completion metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TINY

from maxmodel.eval import metrics
from maxmodel.eval.perplexity import windows
from maxmodel.eval.prompts import PromptSpec, build_prompt, fewshot_examples

SEQ = 32


@pytest.fixture(scope="module")
def trainer():
    """A random tiny model with its train step on a data=4 x fsdp=2 mesh."""
    import jax
    from flax import nnx

    from maxmodel.config import load_config_args
    from maxmodel.parallel.mesh import build_mesh
    from maxmodel.parallel.rules import mesh_rules
    from maxmodel.train.step import abstract_state, build_train_step, create_params
    cfg = load_config_args(TINY + ["mesh.data=4", "mesh.fsdp=2", f"train.seq_len={SEQ}", "model.max_seq_len=64"])
    mesh = build_mesh(cfg.mesh)
    rules = mesh_rules(cfg.mesh, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
    return cfg, graphdef, params, mesh, rules, ts


def _scorer(trainer, **kw):
    from maxmodel.eval.scoring import PackedScorer
    cfg, graphdef, params, mesh, rules, _ = trainer
    return PackedScorer(cfg, graphdef, params, mesh, rules, **kw)


def _forward_logprobs(trainer, tokens: list[int]) -> np.ndarray:
    """log_softmax of the model's plain forward pass on one sequence (float64), padded at the end to 64
    (one compiled shape; causal attention: what follows a position does not change it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    _, graphdef, params, mesh, rules, _ = trainer
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        logits = nnx.merge(graphdef, params)(jnp.asarray([tokens + [0] * (64 - len(tokens))] * 8))[0, :len(tokens)]
    logits = np.asarray(logits, np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_packed_scoring_equals_unpacked_and_the_forward_pass(trainer):
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(40):
        toks = rng.integers(0, 512, size=int(rng.integers(2, 40))).tolist()
        seqs.append((toks, int(rng.integers(1, len(toks)))))
    scorer = _scorer(trainer, rows=8, row_len=32, max_len=64)
    assert scorer.rows == 8 and scorer.buckets == (32, 64)
    packed = scorer.score(seqs)
    passes = scorer.forward_passes
    assert passes <= 4, passes  # 40 requests, about 800 tokens: a few [8, 32|64] rows
    alone = [scorer.score([s])[0] for s in seqs[:12]]
    for (toks, start), p, a in zip(seqs, packed, alone):
        assert p.logprob == pytest.approx(a.logprob, abs=1e-5) and p.is_greedy == a.is_greedy and p.tokens == a.tokens
    for (toks, start), p in zip(seqs[:12], packed):
        lp = _forward_logprobs(trainer, toks)
        want = sum(lp[j - 1, toks[j]] for j in range(start, len(toks)))
        assert p.logprob == pytest.approx(want, abs=1e-5)
        assert p.is_greedy == all(lp[j - 1].argmax() == toks[j] for j in range(start, len(toks)))
        assert p.tokens == len(toks) - start
    with pytest.raises(ValueError, match="max_len=64"):
        scorer.score([(list(range(66)), 1)])


def test_rolling_perplexity_equals_the_training_loss_on_the_same_windows(trainer):
    import jax
    from flax import nnx

    from maxmodel.data.packing import PackedRows
    from maxmodel.data.store import MemoryStore
    from maxmodel.train.step import global_batch
    _, _, params, mesh, rules, ts = trainer
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 512, size=SEQ * k + 1).astype(np.int32) for k in (1, 3, 4)]  # whole windows each
    store = MemoryStore([(d, np.ones(len(d), np.uint8)) for d in docs])
    rows = PackedRows(store, SEQ, pad_id=0, packing="none")
    assert len(rows) == 8  # one batch of the train step's eval function
    batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        nll, count, _ = ts.eval_fn(params, global_batch(batch, mesh))
    scorer = _scorer(trainer, rows=8, row_len=SEQ, max_len=SEQ)
    pieces = [w for d in docs for w in windows(d.tolist(), SEQ)]
    assert len(pieces) == 8 and all(len(t) == SEQ + 1 and s == 1 for t, s in pieces)  # disjoint windows
    scores = scorer.score(pieces)
    assert sum(s.tokens for s in scores) == int(count)
    assert -sum(s.logprob for s in scores) / int(count) == pytest.approx(float(nll) / float(count), abs=1e-5)


def test_rolling_windows_score_every_token_once_with_the_most_context():
    tokens = list(range(100))
    for stride in (32, 10, 1):
        pieces = windows(tokens, 32, stride)
        scored = [t for seq, start in pieces for t in seq[start:]]
        assert scored == tokens[1:]  # each token once, in order
        assert all(len(seq) - 1 <= 32 for seq, _ in pieces)
        # after the first window every window's inputs are full: the longest context that fits
        assert all(len(seq) == 33 for seq, start in pieces if seq[start] > 32)
    with pytest.raises(Exception, match="stride"):
        windows(tokens, 32, 33)


def test_few_shot_prompts_are_deterministic_for_a_seed():
    pool = [{"question": f"q{i}", "answer_text": f"a{i}", "rationale": f"because {i}"} for i in range(20)]
    spec = PromptSpec("Q: {question}\nA:", " {answer_text}", num_fewshot=3, seed=7)

    def prompts(seed, order):
        s = PromptSpec(**{**spec.__dict__, "seed": seed})
        return {i: build_prompt(s, pool[i], fewshot_examples(pool, 3, seed, i, exclude=pool[i])) for i in order}
    first = prompts(7, range(20))
    assert prompts(7, reversed(range(20))) == first  # the same whatever the order evaluated
    assert prompts(8, range(20)) != first
    p = first[5]
    assert p.endswith("Q: q5\nA:") and p.count("Q: ") == 4 and "Q: q5\nA: a5" not in p  # never itself
    assert p.split("\n\n")[0].startswith("Q: q") and " a" in p.split("\n\n")[0]
    cot = build_prompt(PromptSpec("Q: {question}\nA:", " {answer_text}", cot=True), pool[0], pool[1:3])
    assert "A: because 1 The answer is a1." in cot and cot.endswith("Q: q0\nA:")
    assert build_prompt(PromptSpec("Q: {question}\nA:", "", cot=True), pool[0], []).endswith(
        "A: Let's think step by step.")
    with pytest.raises(Exception, match="'missing'"):
        build_prompt(PromptSpec("{missing}", ""), pool[0], [], "f.jsonl:3")


def test_exact_match_f1_bleu_rouge_agree_with_the_libraries():
    import sacrebleu
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer  # the SQuAD v1.1 script's
    from rouge_score import rouge_scorer
    preds = ["The cat sat on the mat.", "a quick brown fox", "Paris", "forty two", "nothing in common"]
    refs = [["the cat sat on a mat"], ["The quick brown dog"], ["paris", "Paris, France"], ["42", "forty-two"],
            ["entirely different"]]
    em = np.mean([max(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(preds, refs)])
    assert metrics.exact_match(preds, refs) == pytest.approx(em) and 0 < em < 1
    f1 = np.mean([max(f1_abstractive([p], [r]) for r in rs) for p, rs in zip(preds, refs)])
    assert metrics.f1(preds, refs) == pytest.approx(f1) and 0 < f1 < 1
    streams = [[rs[min(i, len(rs) - 1)] for rs in refs] for i in range(2)]
    assert metrics.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    single = [[r[0]] for r in refs]
    assert metrics.bleu(preds, single) == pytest.approx(sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = np.mean([max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(preds, refs)])
    assert metrics.rouge(preds, refs)["rougeL"] == pytest.approx(want)
    out = metrics.compute(["em", "f1", "test_eval_scoring:longest_prediction"], preds, refs)
    assert out == {"em": pytest.approx(em), "f1": pytest.approx(f1), "longest_prediction": 23.0}
    with pytest.raises(Exception, match="unknown metric 'bleurt'"):
        metrics.resolve("bleurt")
    with pytest.raises(Exception, match="cannot import metric 'no_such_module:f'"):
        metrics.resolve("no_such_module:f")


def longest_prediction(predictions, references) -> float:
    """A custom metric, imported by path in the test above."""
    return float(max(map(len, predictions)))


def test_bits_per_byte_is_nats_over_bytes():
    class Model:  # what perplexity() reads of an EvalModel, with a scorer that gives every token ln(1/2)
        max_length = 8

        class tokenizer:
            bos_id = 1

        @staticmethod
        def encode(text, bos=True):
            return list(text.encode())

        class scorer:
            @staticmethod
            def score(pieces):
                from maxmodel.eval.scoring import Score
                return [Score(-math.log(2) * (len(t) - s), False, len(t) - s) for t, s in pieces]
    from maxmodel.eval.perplexity import perplexity
    out = perplexity(Model, [("ab cd", "x"), ("é", "y")], stride=3)
    assert out["tokens"] == 7 and out["bytes"] == 7 and out["words"] == 3  # é is 2 bytes
    assert out["bits_per_byte"] == pytest.approx(1.0) and out["token_perplexity"] == pytest.approx(2.0)
    assert out["word_perplexity"] == pytest.approx(math.exp(7 * math.log(2) / 3))
