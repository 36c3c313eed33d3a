"""The whole loop: run directory contents, metrics, resume from the latest checkpoint."""
import json

import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import load_config
from maxmodel.train.loop import train


def test_run_directory_and_metrics(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides + ["run.name=m", "train.steps=4", "run.log_every=2",
                                                  "run.eval_every=4", "run.eval_batches=1", "checkpoint.every_steps=4"])
    result = train(cfg)
    run_dir = tmp_path / "m"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "4").is_dir()
    assert any((run_dir / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time"):
        assert key in records[0]
    assert 0 < records[1]["mfu"] < 1 and records[1]["tokens_per_sec"] > 0
    assert "eval_loss" in records[1] and result.eval_loss == pytest.approx(records[1]["eval_loss"])


def test_resume_continues_from_the_last_checkpoint(tiny_overrides, tmp_path):
    common = tiny_overrides + ["run.name=r", "run.log_every=1", "checkpoint.every_steps=100", "train.steps=4",
                               "optimizer.warmup_steps=1"]
    full = train(load_config(overrides=common + [f"run.output_dir={tmp_path / 'full'}"]))
    first = train(load_config(overrides=common), stop_at_step=2)  # stopped early, with a checkpoint
    assert first.final_step == 2
    # The same config again: it continues at step 2 and matches the uninterrupted run.
    second = train(load_config(overrides=common))
    assert second.start_step == 2 and second.final_step == 4
    assert second.losses[3] == pytest.approx(full.losses[3], rel=1e-6)
    assert second.losses[4] == pytest.approx(full.losses[4], rel=1e-6)


def test_cli_train_exit_code_and_report(tiny_overrides, tmp_path, capsys):
    assert cli_main(["train", *tiny_overrides, "run.name=c", "train.steps=2", "checkpoint.enabled=false"]) == 0
    assert "steps: 0 -> 2" in capsys.readouterr().out
