"""The trainer under faults: exact resume, SIGTERM, non-finite losses, params-only export and init.from.

All runs share one config (6 steps) so they share one compiled step (the compilation cache)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import load_config
from maxmodel.train import loop
from maxmodel.train.checkpoint import ITEMS
from maxmodel.train.loop import train

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.steps=6", "run.log_every=1", "run.eval_batches=0", "run.eval_every=1000",
          "checkpoint.every_steps=3", "checkpoint.keep=10"]


def load_step(ckpt_dir: Path, step: int) -> tuple:
    """(params, opt_state) of a saved step as numpy trees."""
    with ocp.CheckpointManager(ckpt_dir.absolute(), item_names=ITEMS) as manager:
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                            opt_state=ocp.args.StandardRestore()))
    return jax.device_get(out.params), jax.device_get(out.opt_state)


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stop_and_resume_gives_bitwise_identical_losses(tiny_overrides, tmp_path):
    full = train(load_config(overrides=tiny_overrides + COMMON + ["run.name=full"]))
    first = train(load_config(overrides=tiny_overrides + COMMON + ["run.name=split"]), stop_at_step=3)
    second = train(load_config(overrides=tiny_overrides + COMMON + ["run.name=split"]))
    assert (first.start_step, first.final_step, second.start_step, second.final_step) == (0, 3, 3, 6)
    assert [first.losses[s] for s in (1, 2, 3)] == [full.losses[s] for s in (1, 2, 3)]
    assert [second.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]  # bitwise
    assert_trees_equal(load_step(tmp_path / "full" / "checkpoints", 6),
                       load_step(tmp_path / "split" / "checkpoints", 6))
    meta = json.loads((tmp_path / "split" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6 and meta["config"]["run"]["name"] == "split" and meta["metrics"]["loss"] == full.losses[6]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _launch_and_terminate(args: list[str], run_dir: Path, after_lines: int) -> tuple[int, str]:
    """Start `maxmodel train`, send SIGTERM once metrics.jsonl has `after_lines` lines, return (code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "maxmodel.cli", "train", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(_metrics(run_dir)) < after_lines and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigterm_checkpoints_exits_3_and_relaunch_continues(tiny_overrides, tmp_path):
    args = tiny_overrides + ["run.name=p", "train.steps=1000", "run.log_every=1", "run.eval_every=1000",
                             "run.eval_batches=0", "checkpoint.every_steps=1000"]
    run_dir = tmp_path / "p"
    code, err = _launch_and_terminate(args, run_dir, after_lines=1)
    assert code == 3, err[-2000:]
    reached = _metrics(run_dir)[-1]["step"]  # the step it finished after the signal
    assert 1 <= reached < 1000
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [reached]
    meta = json.loads((run_dir / "checkpoints" / str(reached) / "meta" / "metadata").read_text())
    assert meta["step"] == reached

    # The same command again continues from that step (and is stopped again the same way).
    code, err = _launch_and_terminate(args, run_dir, after_lines=len(_metrics(run_dir)) + 1)
    assert code == 3, err[-2000:]
    assert f"resumed from step {reached}" in err
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps[: steps.index(reached) + 2] == list(range(1, reached + 2))  # no step lost or repeated


class NaNInjector:
    """Wraps the data iterator; the batch of each step in `bad_steps` (1-based) gets a NaN loss-mask entry."""

    def __init__(self, it, bad_steps):
        self.it, self.bad_steps, self.n = it, set(bad_steps), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch, self.n = next(self.it), self.n + 1
        if self.n in self.bad_steps:
            batch = dict(batch, loss_mask=batch["loss_mask"].copy())
            batch["loss_mask"][0, 0] = np.nan
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.fixture
def nan_at(monkeypatch):
    def install(*bad_steps):
        real = loop.make_train_data

        def make(*args, **kwargs):
            data = real(*args, **kwargs)
            data.train = NaNInjector(data.train, bad_steps)
            return data
        monkeypatch.setattr(loop, "make_train_data", make)
    return install


def test_nonfinite_step_is_skipped_and_counted(tiny_overrides, tmp_path, nan_at):
    nan_at(2)
    result = train(load_config(overrides=tiny_overrides + COMMON + ["run.name=n", "checkpoint.every_steps=1"]),
                   stop_at_step=3)
    records = {r["step"]: r for r in _metrics(tmp_path / "n")}
    assert records[2]["loss"] is None and np.isfinite(records[3]["loss"])  # not known: null (strict JSON)
    assert [records[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    ckpts = tmp_path / "n" / "checkpoints"
    p1, o1 = load_step(ckpts, 1)
    p2, o2 = load_step(ckpts, 2)
    p3, _ = load_step(ckpts, 3)
    assert_trees_equal(p1, p2)            # the NaN step changed nothing ...
    assert_trees_equal(o1["inner"], o2["inner"])
    assert int(o2["skipped"]) == 1 and int(o2["steps"]) == 2
    assert not np.array_equal(np.asarray(jax.tree.leaves(p3)[0]), np.asarray(jax.tree.leaves(p2)[0]))  # ... 3 did
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p3)) and result.final_step == 3


def test_nonfinite_with_stop_exits_1_with_the_last_good_state(tiny_overrides, tmp_path, nan_at, capsys):
    nan_at(3)
    code = cli_main(["train", *tiny_overrides, *COMMON, "run.name=s", "checkpoint.every_steps=2",
                     "train.on_nonfinite=stop"])
    assert code == 1
    assert "non-finite loss or gradients at step 3" in capsys.readouterr().err
    ckpts = tmp_path / "s" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 3]
    p2, o2 = load_step(ckpts, 2)
    p3, o3 = load_step(ckpts, 3)
    assert_trees_equal(p2, p3)            # step 3's checkpoint holds step 2's (last good) state
    assert_trees_equal(o2["inner"], o3["inner"])
    assert int(o3["skipped"]) == 1 and bool(o3["halted"])


def test_export_bf16_and_init_from(tiny_overrides, tmp_path, capsys):
    src = tiny_overrides + COMMON + ["run.name=src"]
    train(load_config(overrides=src), stop_at_step=3)
    out = tmp_path / "export"
    tok = tmp_path / "tok"  # a Hugging Face tokenizer (as data.tokenizer names it) travels with the export
    tok.mkdir()
    (tok / "my-tok.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert cli_main(["export", "--step", "3", "--out", str(out), "--dtype", "bfloat16", *src,
                     f"data.tokenizer={tok / 'my-tok.json'}"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 3 and info["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert cli_main(["export", "--step", "5", "--out", str(tmp_path / "x"), *src]) == 2  # no such step
    assert "no checkpoint at step 5" in capsys.readouterr().err

    exported, _ = load_step(tmp_path / "src" / "checkpoints", 3)
    # A new run from the export with lr=0: after one step its weights are still the exported (bf16) ones.
    new = train(load_config(overrides=tiny_overrides + COMMON + [
        "run.name=ft", f"init.from={out}", "optimizer.lr=0", "checkpoint.enabled=false"]), stop_at_step=1)
    assert new.start_step == 0
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(jax.device_get(new.params))):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), b)
    assert cli_main(["train", *tiny_overrides, "run.name=bad", f"init.from={tmp_path}"]) == 2
