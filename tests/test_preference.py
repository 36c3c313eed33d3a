"""Preference tuning (reward, dpo, ipo, orpo, simpo, kto) on a synthetic preference set with a learnable rule
(tests/preference_data.py): DPO's first loss is ln 2; every method reaches > 90% held-out pair accuracy (each
method's own implicit reward, the reward model's score); 8 devices with fsdp x tensor sharding give the
1-device losses; a stopped and resumed run continues bitwise; SIGTERM checkpoints and exits 3. The runs of
one method share a config, so its full run, its split run and its resume share one compiled step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import preference_data
from conftest import TINY
from flax import nnx
from test_fault_tolerance import _launch_and_terminate, _metrics, assert_trees_equal

from maxmodel.config import ConfigError, load_config
from maxmodel.data.pipeline import make_train_data
from maxmodel.data.preference import PreferenceRows, encode_groups
from maxmodel.data.sources import BadRecords, read_documents
from maxmodel.data.tokenizer import ByteTokenizer
from maxmodel.finetune import objectives
from maxmodel.finetune.objectives import token_logps
from maxmodel.finetune.preference import doc_sums, pair_terms, pairs
from maxmodel.finetune.reward_scorer import RewardScorer
from maxmodel.models.score_head import document_scores, token_scores
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train.loop import train
from maxmodel.train.step import abstract_state, build_train_step, create_params, global_batch

METHODS = {"dpo": "pair", "ipo": "pair", "orpo": "pair", "simpo": "pair", "kto": "unpaired", "reward": "pair"}
STEPS = ["train.steps=20", "run.log_every=1", "run.eval_every=20", "run.eval_batches=2",
         "checkpoint.every_steps=10", "checkpoint.keep=10"]
BASE = TINY + ["train.seq_len=64", "data.source=jsonl", "data.format=preference", "data.tokenizer=bytes",
               "optimizer.lr=3e-3", "optimizer.weight_decay=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefdata")
    files = {kind: preference_data.write(d / f"{kind}.jsonl", 400, 0, kind) for kind in
             ("pair", "unpaired", "ranked", "scored")}
    files["eval"] = preference_data.write(d / "eval.jsonl", 64, 1, "pair")
    return files


def overrides(method, data, tmp, *extra):
    kind = METHODS.get(method, "pair")
    return BASE + [f"train.objective={method}", f"data.path={data[kind]}", f"data.eval_path={data['eval']}",
                   f"run.output_dir={tmp}", *extra]


RUNS = {}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    def run(method):
        if method not in RUNS:
            tmp = tmp_path_factory.mktemp(method)
            cfg = load_config(overrides=overrides(method, data, tmp, *STEPS, "run.name=full"))
            RUNS[method] = (cfg, tmp, train(cfg))
        return RUNS[method]
    return run


def pair_accuracy(cfg, result, eval_path):
    """Held-out pairs ordered by the trained model: the method's implicit reward (kto: dpo's log-ratio, which
    its loss also uses) against the starting weights as the reference, or the reward model's score."""
    method = {"kto": "dpo"}.get(cfg.train.objective, cfg.train.objective)
    bad = BadRecords()
    docs = [d for d, _ in read_documents("jsonl", str(eval_path), "preference", "text", bad)]
    D = cfg.dpo.max_docs
    rows = PreferenceRows(encode_groups(docs, "dpo", ByteTokenizer(), "", cfg.train.seq_len, D, bad),
                          cfg.train.seq_len, 0, "first_fit", D)
    batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}
    with jax.set_mesh(result.mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, result.mesh)):
        _, abstract = abstract_state(cfg)
        start = create_params(cfg, jax.tree.map(lambda x: x.sharding, result.params))

        @jax.jit
        def rewards(params, start, b):
            model, seg = nnx.merge(result.graphdef, params), b["segment_ids"]
            n = doc_sums(b["loss_mask"], seg, D)
            if method == "reward":
                return pairs(document_scores(token_scores(model, b), seg, b["positions"], D)) + (n,)
            pol = doc_sums(token_logps(model, b), seg, D)
            ref = doc_sums(token_logps(nnx.merge(result.graphdef, start), b), seg, D)
            return pair_terms(method, cfg.dpo, pol, n, ref)[1:] + (n,)
        chosen, rejected, n = jax.device_get(rewards(result.params, start, batch))
    valid = (pairs(n)[0] > 0) & (pairs(n)[1] > 0)
    assert valid.sum() == len(docs)  # every held-out pair was scored
    return float((chosen > rejected)[valid].mean())


def test_dpo_first_loss_is_ln2(full_run):
    _, _, result = full_run("dpo")
    assert abs(result.losses[1] - math.log(2)) < 1e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_learns_the_rule_and_resumes_exactly(method, full_run, data):
    cfg, tmp, full = full_run(method)
    accuracy = pair_accuracy(cfg, full, data["eval"])
    assert accuracy > 0.9, (method, accuracy)
    assert full.losses[20] < full.losses[1]
    assert "eval_reward_accuracy" in full.eval_metrics and "reward_margin" in _metrics(tmp / "full")[-1]
    split = load_config(overrides=overrides(method, data, tmp, *STEPS, "run.name=split"))
    first = train(split, stop_at_step=10)
    second = train(split)
    assert (first.final_step, second.start_step, second.final_step) == (10, 10, 20)
    resumed = [first.losses[s] for s in range(1, 11)] + [second.losses[s] for s in range(11, 21)]
    assert resumed == [full.losses[s] for s in range(1, 21)]  # bitwise
    assert_trees_equal(jax.device_get(full.params), jax.device_get(second.params))


STEPPED = {}  # (method, overrides, devices) -> losses: the 1-device runs are shared between tests


def _three_steps(method, data, tmp, devices, extra):
    key = (method, tuple(extra), len(devices))
    if key not in STEPPED:
        STEPPED[key] = _run_three(method, data, tmp, devices, extra)
    return STEPPED[key]


def _run_three(method, data, tmp, devices, extra):
    cfg = load_config(overrides=overrides(method, data, tmp, "train.steps=3", "run.name=eq", *extra))
    mesh = build_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        source = make_train_data(cfg, tmp / "eq")
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = create_params(cfg, ts.param_shardings)
        opt_state = ts.init_opt(params)
        obj = objectives.get(method)
        prepare = obj.prepare(cfg, ts, mesh) if obj.prepare else (lambda s, p, local: global_batch(local, mesh))
        out = []
        for step in range(3):
            params, opt_state, m = ts.step_fn(params, opt_state, prepare(step, params, next(source.train)))
            out.append((float(m["loss"]), float(m["grad_norm"]), float(m["reward_accuracy"])))
    return np.array(out)


EQUALITY = {**{m: [] for m in METHODS}, "dpo-lora": ["peft.method=lora", "peft.targets=all", "peft.rank=4"]}


@pytest.mark.parametrize("case", list(EQUALITY))
def test_eight_devices_fsdp_tensor_equal_one_device(case, data, tmp_path):
    method = case.split("-")[0]
    extra = ["optimizer.lr=3e-3", "optimizer.warmup_steps=0", *EQUALITY[case]]
    one = _three_steps(method, data, tmp_path, jax.devices()[:1], extra + ["mesh.data=1"])
    eight = _three_steps(method, data, tmp_path, jax.devices(),
                         extra + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    np.testing.assert_allclose(eight[:, :2], one[:, :2], rtol=1e-5, atol=1e-7)  # loss, grad norm
    # Reward accuracy counts the pairs whose margin is > 0. At step 1 the policy is the reference, so every
    # margin is 0 up to rounding, which differs between layouts (and CPUs): compare it once the weights moved.
    np.testing.assert_array_equal(eight[1:, 2], one[1:, 2])
    assert one[-1, 0] != one[0, 0]  # the weights moved
    if case == "dpo-lora":  # the reference is the adapter-free base: the policy at step 1 exactly
        assert abs(one[0, 0] - math.log(2)) < 1e-6


def test_chunked_head_gives_the_materialised_logits_losses(data, tmp_path):
    """train.loss_chunk: per-token log-probs over chunks of positions (no [B, L, V] logits), policy and
    reference alike, give the same losses and gradient norms."""
    extra = ["optimizer.lr=3e-3", "optimizer.warmup_steps=0", "mesh.data=1"]
    plain = _three_steps("dpo", data, tmp_path, jax.devices()[:1], extra)
    chunked = _three_steps("dpo", data, tmp_path, jax.devices()[:1], extra + ["train.loss_chunk=16"])
    np.testing.assert_allclose(chunked, plain, rtol=1e-5, atol=1e-7)


def test_precomputed_reference_gives_the_live_losses(full_run, data):
    cfg, tmp, live = full_run("dpo")
    steps = ["train.steps=20", "run.log_every=1", "run.eval_every=1000", "run.eval_batches=2",
             "checkpoint.enabled=false"]
    pre = train(load_config(overrides=overrides("dpo", data, tmp, *steps, "run.name=pre",
                                                "dpo.reference=precomputed")), stop_at_step=4)
    np.testing.assert_allclose([pre.losses[s] for s in range(1, 5)], [live.losses[s] for s in range(1, 5)],
                               rtol=1e-5)
    assert (tmp / "pre" / "reference_logps.npz").is_file()


def test_sigterm_on_a_dpo_run_checkpoints_and_exits_3(data, tmp_path):
    args = overrides("dpo", data, tmp_path, "run.name=t", "train.steps=1000", "run.log_every=1",
                     "run.eval_every=1000", "run.eval_batches=0", "checkpoint.every_steps=1000")
    code, err = _launch_and_terminate(args, tmp_path / "t", after_lines=1)
    assert code == 3, err[-2000:]
    reached = _metrics(tmp_path / "t")[-1]["step"]
    assert sorted(int(p.name) for p in (tmp_path / "t" / "checkpoints").iterdir() if p.name.isdigit()) == [reached]


@pytest.mark.parametrize("kind", ["ranked", "scored"])
def test_reward_model_on_ranked_lists_and_scores(kind, data, tmp_path):
    held = preference_data.write(tmp_path / "held.jsonl", 64, 1, kind)
    steps = ["train.steps=30", "run.log_every=10", "run.eval_every=30", "run.eval_batches=2",
             "checkpoint.every_steps=30", f"data.path={data[kind]}", f"data.eval_path={held}"]
    result = train(load_config(overrides=overrides("reward", data, tmp_path, *steps, "run.name=r")))
    report = RewardScorer(tmp_path / "r", ["data.tokenizer=bytes"]).report(held)  # the run dir's checkpoint
    if kind == "ranked":  # Plackett-Luce: every (better, worse) pair of a list ordered
        assert result.eval_metrics["eval_reward_accuracy"] > 0.9
        assert report["ordered_pairs"] == 3 * 64 and report["accuracy"] > 0.9
    else:  # regression onto the vowel share: a small squared error (the scores' variance is about 0.1)
        assert result.eval_metrics["eval_score_error"] < 0.03 < result.losses[10]
        assert report["scored"] == 64 and report["pearson"] > 0.9


@pytest.mark.parametrize("bad_overrides, key", [
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
    (["dpo.max_docs=3"], "dpo.max_docs"),
    (["dpo.refrence=live"], "dpo.refrence"),
    (["data.format=chat"], "data.format"),
])
def test_bad_settings_name_the_key(bad_overrides, key, data, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides("dpo", data, tmp_path, *bad_overrides))
    assert e.value.key == key


def test_first_step_gradient_flows_into_a_zero_head(data, tmp_path):
    """The score head starts at zero (every score 0, Bradley-Terry ln 2) and still trains at once."""
    out = _three_steps("reward", data, tmp_path, jax.devices()[:1], ["mesh.data=1", "optimizer.warmup_steps=0"])
    assert abs(out[0, 0] - math.log(2)) < 1e-6 and out[0, 1] > 0 and out[-1, 0] < out[0, 0]


def test_document_sums_follow_the_segments():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    values = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]])
    np.testing.assert_array_equal(doc_sums(values, seg, 4), [[3.0, 12.0, 0.0, 0.0]])
    pos = jnp.array([[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(document_scores(values, seg, pos, 4), [[2.0, 5.0, 0.0, 0.0]])  # last positions
    order = jnp.array([3, 0, 5, 1, 4, 2])  # a permuted sequence (ring attention's order): the same documents
    np.testing.assert_array_equal(document_scores(values[:, order], seg[:, order], pos[:, order], 4),
                                  [[2.0, 5.0, 0.0, 0.0]])
