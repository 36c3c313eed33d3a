"""GRPO on the generation engine (finetune/rl, objectives/grpo.py): the sampler's log-probs are the trainer's,
a group without reward spread gives no gradient, the aggregation modes and KL estimators are what their
papers define, a bad reward function is named, and a GRPO run on the toy arithmetic task is exact on 8
devices and on resume, and checkpoints + exits 3 on SIGTERM."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from test_fault_tolerance import _launch_and_terminate, _metrics

from maxmodel.config import ConfigError, load_config
from maxmodel.data.sources import DataError
from maxmodel.finetune.objectives import grpo, token_logps
from maxmodel.finetune.rl.rewards import RewardError, group_advantages, load_rewards, score
from maxmodel.finetune.tasks import arithmetic
from maxmodel.models.registry import build_model
from maxmodel.parallel.mesh import build_mesh
from maxmodel.parallel.rules import mesh_rules
from maxmodel.train import loop
from maxmodel.train.export import export
from maxmodel.train.loop import train
from maxmodel.train.step import abstract_state, build_train_step

MODEL = [o for o in TINY if not o.startswith(("model.vocab_size", "train."))] + [
    "model.vocab_size=260", "data.tokenizer=bytes", "checkpoint.every_steps=1000", "run.eval_every=1000"]
TASK = "maxmodel.finetune.tasks.arithmetic"
GRPO = ["train.objective=grpo", "data.source=jsonl", "data.format=prompt", "train.seq_len=16",
        "train.batch_size=16", "rl.group_size=4", "rl.max_new_tokens=4", "rl.beta=0.04", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=0", "optimizer.weight_decay=0", "run.log_every=1",
        f"rl.rewards=[{{fn: {TASK}.exact_match}}, {{fn: {TASK}.format, weight: 0.2}}]"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The arithmetic prompts and a tiny byte-level model warm-started on half of the answers (SFT)."""
    root = tmp_path_factory.mktemp("arith")
    arithmetic.write(root / "data", seed=0)
    sft = load_config(overrides=MODEL + [
        f"run.output_dir={root}", "run.name=sft", "train.objective=sft", "data.source=jsonl",
        "data.format=prompt_completion", f"data.path={root / 'data' / 'sft.jsonl'}", "train.seq_len=32",
        "train.batch_size=16", "train.steps=60", "optimizer.lr=3e-3", "mesh.data=-1"])
    train(sft)
    export(sft, None, str(root / "sft-model"), None)
    return root


def grpo_overrides(task, name, *extra):
    return MODEL + GRPO + [f"run.output_dir={task}", f"run.name={name}", f"init.from={task / 'sft-model'}",
                           f"data.path={task / 'data' / 'prompts.jsonl'}", *extra]


def test_sampler_logprobs_equal_the_trainers_on_a_sharded_mesh(task):
    """The rollout's `old_logps` (the engine's raw log-probs, KV-cached decoding on data x fsdp x tensor)
    equal a plain forward pass's log-probs of the same tokens (float32, 1e-5)."""
    from maxmodel.data.pipeline import make_train_data
    from maxmodel.train.export import load_params
    from maxmodel.train.checkpoint import abstract_like
    cfg = load_config(overrides=grpo_overrides(task, "lp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    mesh = build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        graphdef, abstract = abstract_state(cfg)
        ts = build_train_step(cfg, graphdef, abstract, mesh)
        params = load_params(cfg.init.from_, abstract_like(abstract, ts.param_shardings))
        data = make_train_data(cfg, task / "lp")
        prepare = grpo.OBJECTIVE.prepare(cfg, ts, mesh, data)
        batch = prepare(0, params, next(data.train))
        trainer = jax.jit(lambda p, b: token_logps(nnx.merge(graphdef, p), b))(params, batch)
        compiled = dict(prepare.generator.engine.traces)
        prepare(1, jax.tree.map(lambda x: x * 1.0, params), next(data.train))  # new weights pushed in place
        assert dict(prepare.generator.engine.traces) == compiled  # nothing recompiled
    mask = np.asarray(batch["loss_mask"]) > 0
    assert mask.sum() >= cfg.train.batch_size  # every completion has at least one token
    np.testing.assert_allclose(np.asarray(trainer)[mask], np.asarray(batch["old_logps"])[mask], atol=1e-5)
    # the reference (the frozen starting copy) is the policy before any update
    np.testing.assert_allclose(np.asarray(batch["ref_logps"])[mask], np.asarray(trainer)[mask], atol=1e-5)
    _, completions, rewards, _ = prepare.last_rollout
    assert sum(len(g) for g in completions) == cfg.train.batch_size and rewards.shape == (cfg.train.batch_size,)
    assert set(prepare.metrics) >= {"reward", "reward_std", "reward/exact_match", "reward/exact_match_std",
                                    "reward/format", "completion_length",
                                    "zero_spread_groups", "rollout_seconds", "rollout_tokens_per_sec"}


def test_equal_rewards_give_zero_advantages_and_zero_gradient():
    adv, stats = group_advantages(np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.5]), 3, scale=True)
    np.testing.assert_array_equal(adv[:3], 0.0)
    assert stats["zero_spread_groups"] == 0.5 and abs(adv[3:].sum()) < 1e-9
    assert np.isclose(adv[3:].std(ddof=1), 1.0, atol=1e-3)  # scaled by the group's std

    cfg = load_config(overrides=MODEL + ["train.objective=grpo", "data.format=prompt", "data.source=jsonl",
                                         "train.seq_len=8", "mesh.data=1"])
    mesh = build_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules(cfg.mesh, mesh)):
        _zero_gradient_checks(cfg, build_model(cfg, nnx.Rngs(0)))


def _zero_gradient_checks(cfg, model):
    rng = np.random.default_rng(0)
    b, length = 4, 8
    batch = {"inputs": rng.integers(3, 259, (b, length)), "targets": rng.integers(3, 259, (b, length)),
             "segment_ids": np.ones((b, length), np.int32), "positions": np.tile(np.arange(length), (b, 1)),
             "loss_mask": np.tile((np.arange(length) >= 3).astype(np.float32), (b, 1))}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logp = token_logps(model, batch)
    batch.update(old_logps=logp, ref_logps=logp, advantages=jnp.zeros((b, length)))
    from maxmodel.finetune.objectives import LossSettings
    graphdef, state = nnx.split(model)

    def objective(state):
        return grpo.loss(nnx.merge(graphdef, state), batch, LossSettings(cfg=cfg))[0]
    grads = jax.grad(objective)(state)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
    batch["advantages"] = jnp.ones((b, length))  # and with a signal there is one
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(jax.grad(objective)(state))) > 0


def test_aggregation_modes_and_kl_estimators_follow_their_definitions():
    rng = np.random.default_rng(1)
    mask = (rng.random((3, 6)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    loss = rng.normal(size=(3, 6)).astype(np.float32)
    per_row = [loss[i][mask[i] > 0].mean() for i in range(3)]
    want = {"grpo": np.mean(per_row), "dapo": (loss * mask).sum() / mask.sum(),
            "dr_grpo": (loss * mask).sum() / (3 * 5)}
    for agg, value in want.items():
        w, count = grpo.token_weights(jnp.asarray(mask), agg, max_new_tokens=5)
        np.testing.assert_allclose(float(jnp.sum(w * loss) / count), value, rtol=1e-6)
    logp, ref = (np.log(rng.uniform(0.05, 1, 1000)).astype(np.float32) for _ in range(2))
    k3 = np.asarray(grpo.kl_terms(jnp.asarray(logp), jnp.asarray(ref), "k3"))
    np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)  # float32
    assert (k3 >= 0).all()
    np.testing.assert_allclose(np.asarray(grpo.kl_terms(jnp.asarray(logp), jnp.asarray(ref), "k1")), logp - ref,
                               rtol=1e-6)
    # clip-higher: a positive advantage stops gaining at 1 + eps_high, a negative one at 1 - eps
    ratio = jnp.array([0.5, 1.0, 1.5, 0.5, 1.5])
    adv = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0])
    out, _, binds = grpo.clipped_surrogate(jnp.log(ratio), jnp.zeros(5), adv, 0.2, 0.28)
    np.testing.assert_allclose(np.asarray(out), [-0.5, -1.0, -1.28, 0.8, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(binds), [False, False, True, True, False])


def _raises(prompts, completions, **_):
    raise KeyError("answer")


def _short(prompts, completions, **_):
    return [1.0]


def _nan(prompts, completions, **_):
    return [float("nan")] + [1.0] * (len(completions) - 1)


@pytest.mark.parametrize("fn, message", [("_raises", "raised KeyError"), ("_short", "returned 1 values for 3"),
                                         ("_nan", "returned nan for completion 0")])
def test_a_bad_reward_function_is_named_or_skipped(fn, message):
    functions = load_rewards([f"test_grpo.{fn}"])
    with pytest.raises(RewardError, match=f"test_grpo.{fn} {message}"):
        score(functions, ["p"] * 3, ["a", "b", "c"], {}, skip_bad=False)
    values, failures = score(functions, ["p"] * 3, ["a", "b", "c"], {}, skip_bad=True)
    assert failures == 1 and np.isnan(values[f"test_grpo.{fn}"][0])
    with pytest.raises(ConfigError, match="rl.rewards\\[0\\].fn"):
        load_rewards(["test_grpo.no_such_function"])


def test_bad_prompt_records_are_named(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    over = grpo_overrides(task, "bad", f"data.path={bad}", "train.steps=1")
    with pytest.raises(DataError, match=f"{bad}:2: missing field 'prompt'"):
        train(load_config(overrides=over))


def test_grpo_is_exact_on_resume_and_on_eight_devices(task, monkeypatch, compile_cache):
    """Stopped after 2 steps and rerun, a GRPO run's losses (rollouts included) are bitwise those of an
    uninterrupted one; on data x fsdp x tensor = 8 devices its losses and gradient norms equal the 1-device
    run's (1e-5). That comparison uses SGD: Adam's first steps divide each gradient by its own magnitude, so
    a component that is zero up to float rounding (the KL term's at the reference) moves by a full lr with a
    sign the layout's reduction order picks, whatever the layout's arithmetic accuracy."""
    steps = ["train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=10", f"run.compile_cache_dir={compile_cache}"]
    sharded = grpo_overrides(task, "full", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *steps)
    full = train(load_config(overrides=sharded))
    split = [o.replace("run.name=full", "run.name=split") for o in sharded]
    first = train(load_config(overrides=split), stop_at_step=2)
    second = train(load_config(overrides=split))
    assert (first.final_step, second.start_step, second.final_step) == (2, 2, 4)
    assert [first.losses[s] for s in (1, 2)] + [second.losses[s] for s in (3, 4)] == \
        [full.losses[s] for s in (1, 2, 3, 4)]
    records = _metrics(task / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["reward/exact_match"] <= 1 and r["kl"] >= 0 for r in records)
    assert records[0]["kl"] < 1e-6  # the first update starts at the reference

    sgd = ["optimizer.name=sgd", "optimizer.lr=0.5", "train.steps=3", f"run.compile_cache_dir={compile_cache}"]
    train(load_config(overrides=grpo_overrides(task, "eight", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                               *sgd)))
    monkeypatch.setattr(loop, "build_mesh", lambda m: build_mesh(m, jax.devices()[:1]))
    train(load_config(overrides=grpo_overrides(task, "one", "mesh.data=1", *sgd)))
    eight, one = (_metrics(task / name) for name in ("eight", "one"))
    for key in ("grad_norm", "reward", "kl"):
        np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=1e-5, atol=1e-7)
    # the loss at step 1 is a sum of advantages times ratios of 1: zero up to rounding; then it is not
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in one], rtol=1e-5, atol=1e-6)
    assert eight[-1]["kl"] > 0


def test_sigterm_on_a_grpo_run_checkpoints_and_exits_3(task):
    args = grpo_overrides(task, "term", "train.steps=1000", "mesh.data=1", "run.cpu_devices=1")
    code, err = _launch_and_terminate(args, task / "term", after_lines=2)
    assert code == 3, err[-2000:]
    reached = _metrics(task / "term")[-1]["step"]
    saved = sorted(int(p.name) for p in (task / "term" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [reached]
    assert json.loads((task / "term" / "metrics.jsonl").read_text().splitlines()[0])["reward"] >= 0


def test_grpo_with_lora_keeps_the_frozen_base_as_its_reference(task):
    """With LoRA the reference is the adapter-free base inside the policy: KL 0 at step 1 (B = 0), > 0 once
    the adapters moved; the engine decodes the adapted model."""
    over = grpo_overrides(task, "lora", "peft.method=lora", "peft.rank=4", "peft.targets=all", "train.steps=3",
                          "optimizer.lr=3e-2")
    result = train(load_config(overrides=over))
    records = _metrics(task / "lora")
    assert records[0]["kl"] < 1e-6 < records[-1]["kl"]
    assert result.stats["state"]["trainable_params"] < result.stats["state"]["total_params"] / 4
