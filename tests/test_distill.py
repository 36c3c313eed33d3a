"""Distillation (objectives/distill.py, objectives/gkd.py) and synthesized datasets (finetune/synthesize.py):
KD and GKD bring a smaller student closer to the teacher on held-out text, both are exact on 8 devices and on
resume, a teacher-written dataset trains a student by SFT, and rejection sampling keeps the best-rewarded
completion of each prompt."""
import json

import jax
import numpy as np
import pytest
from test_fault_tolerance import _metrics
from test_grpo import MODEL, TASK, task  # noqa: F401 - the module-scoped arithmetic task and its SFT model

from maxmodel.config import ConfigError, load_config
from maxmodel.finetune.synthesize import SynthesisSpec, synthesize
from maxmodel.inference.load import load_engine
from maxmodel.parallel.mesh import build_mesh
from maxmodel.train import loop
from maxmodel.train.loop import train

# a student half the teacher's width with one layer (the teacher: test_grpo's d_model=64, 2 layers)
STUDENT = [o for o in MODEL if not o.startswith(("model.d_model", "model.num_layers", "model.d_ff"))] + [
    "model.d_model=32", "model.num_layers=1", "model.d_ff=64", "optimizer.warmup_steps=0", "run.log_every=1"]


def kd(root, name, *extra):
    data = root / "data"
    return STUDENT + [f"run.output_dir={root}", f"run.name={name}", "train.objective=distill",
                      f"distill.teacher={root / 'sft-model'}", "data.source=jsonl", "data.format=prompt_completion",
                      f"data.path={data / 'sft.jsonl'}", f"data.eval_path={data / 'heldout.jsonl'}",
                      "train.seq_len=32", "train.batch_size=8", "optimizer.lr=3e-3", *extra]


def gkd(root, name, *extra):
    return STUDENT + [f"run.output_dir={root}", f"run.name={name}", "train.objective=gkd",
                      f"distill.teacher={root / 'sft-model'}", "data.source=jsonl", "data.format=prompt",
                      f"data.path={root / 'data' / 'prompts.jsonl'}", "train.seq_len=16", "train.batch_size=8",
                      "rl.group_size=2", "rl.max_new_tokens=4", "optimizer.lr=3e-3", *extra]


@pytest.fixture(scope="module")
def heldout(task):  # noqa: F811
    rows = [json.loads(line) for line in (task / "data" / "eval.jsonl").read_text().splitlines()]
    (task / "data" / "heldout.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n" for r in rows))
    return task


def heldout_kl(root, name, init=None):
    """KL(teacher || student) per token on the held-out problems: a distill run that does not move."""
    over = kd(root, name, "optimizer.lr=0", "train.steps=1", *([f"init.from={init}"] if init else []))
    return train(load_config(overrides=over)).eval_loss


def test_kd_and_gkd_lower_the_students_kl_to_the_teacher(heldout):
    from maxmodel.train.export import export
    before = heldout_kl(heldout, "kl-before")  # the seeded initialisation both runs start from
    kd_run = train(load_config(overrides=kd(heldout, "kd", "train.steps=40", "run.eval_every=20")))
    gkd_cfg = load_config(overrides=gkd(heldout, "gkd", "train.steps=40"))
    train(gkd_cfg)
    export(gkd_cfg, None, str(heldout / "gkd-model"), None)
    after_gkd = heldout_kl(heldout, "kl-gkd", heldout / "gkd-model")
    assert kd_run.eval_loss < 0.5 * before and after_gkd < 0.5 * before, (before, kd_run.eval_loss, after_gkd)
    records = _metrics(heldout / "kd")
    assert {"ce", "kd", "eval_loss"} <= set(records[19]) and records[39]["eval_loss"] < records[19]["eval_loss"]


@pytest.mark.parametrize("method", ["distill", "gkd"])
def test_distillation_is_exact_on_resume_and_on_eight_devices(heldout, method, monkeypatch, compile_cache):
    """SGD, as in test_grpo.py: Adam's first steps would turn the float rounding of tiny gradient components
    (here the head's rows of tokens neither model puts mass on) into full-lr moves."""
    make = kd if method == "distill" else gkd
    steps = ["train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=10", "run.eval_batches=0",
             f"run.compile_cache_dir={compile_cache}",
             "optimizer.name=sgd", "optimizer.lr=0.5"]
    layout = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    full = train(load_config(overrides=make(heldout, f"{method}-full", *layout, *steps)))
    first = train(load_config(overrides=make(heldout, f"{method}-split", *layout, *steps)), stop_at_step=2)
    second = train(load_config(overrides=make(heldout, f"{method}-split", *layout, *steps)))
    assert [first.losses[s] for s in (1, 2)] + [second.losses[s] for s in (3, 4)] == \
        [full.losses[s] for s in (1, 2, 3, 4)]
    monkeypatch.setattr(loop, "build_mesh", lambda m: build_mesh(m, jax.devices()[:1]))
    one = train(load_config(overrides=make(heldout, f"{method}-one", "mesh.data=1", *steps)), stop_at_step=3)
    np.testing.assert_allclose([one.losses[s] for s in (1, 2, 3)], [full.losses[s] for s in (1, 2, 3)], rtol=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(heldout):
    with pytest.raises(ConfigError, match="distill.teacher.*vocab_size 260 differs from the student's 300"):
        train(load_config(overrides=kd(heldout, "vocab", "model.vocab_size=300", "train.steps=1")))


@pytest.fixture(scope="module")
def teacher(task):  # noqa: F811
    return load_engine(task / "sft-model", ["run.cpu_devices=1", "mesh.data=1"], max_slots=32, max_len=16)


def test_data_distillation_writes_a_dataset_a_student_trains_on(task, teacher):  # noqa: F811
    out = task / "distilled.jsonl"
    spec = SynthesisSpec(str(task / "data" / "prompts.jsonl"), str(out), n=2, keep="all", max_new_tokens=4,
                         temperature=0.7, seed=3)
    stats = synthesize(teacher, spec, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["written"] == len(rows) == 200 - stats["dropped"] > 150  # empty completions are dropped
    assert {"prompt", "completion", "answer"} <= set(rows[0]) and all(r["completion"].strip() for r in rows)
    with pytest.raises(ConfigError, match="--out.*exists"):  # what was written is never overwritten silently
        synthesize(teacher, spec, progress=False)
    first = out.read_text()
    synthesize(teacher, SynthesisSpec(**{**spec.__dict__, "overwrite": True}), progress=False)
    assert out.read_text() == first  # seeded per prompt: a rerun writes the same file
    run = train(load_config(overrides=STUDENT + [
        f"run.output_dir={task}", "run.name=sft-distilled", "train.objective=sft", "data.source=jsonl",
        "data.format=prompt_completion", f"data.path={out}", "train.seq_len=32", "train.batch_size=8",
        "train.steps=30", "optimizer.lr=3e-3"]))
    assert run.losses[30] < 0.7 * run.losses[1]


def test_rejection_sampling_keeps_the_best_rewarded_completion(task, teacher):  # noqa: F811
    out = task / "best.jsonl"
    spec = SynthesisSpec(str(task / "data" / "prompts.jsonl"), str(out), n=8, keep="best", min_reward=1.0,
                         rewards=[f"{TASK}.exact_match", {"fn": f"{TASK}.format", "weight": 0.2}],
                         max_new_tokens=4, temperature=1.0)
    stats = synthesize(teacher, spec, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["written"] == len(rows) and stats["written"] + stats["dropped"] == 100
    assert rows and all(r["completion"].strip() == r["answer"] and r["reward"] == pytest.approx(1.2) for r in rows)
    # better than one sample per prompt: the best of 8 is right more often than a single draw
    single = synthesize(teacher, SynthesisSpec(**{**spec.__dict__, "out": str(task / "one.jsonl"), "n": 1}),
                        progress=False)
    assert stats["written"] > single["written"]
