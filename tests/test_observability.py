"""Goodput accounting, the profiler trace option, `maxmodel plot`, the compilation cache option."""
import json

import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import ConfigError, load_config
from maxmodel.train.goodput import CATEGORIES, Goodput
from maxmodel.train.loop import train


def test_goodput_laps_split_wall_time():
    now = [0.0]
    g = Goodput(clock=lambda: now[0])
    for category, seconds in [("restart", 2.0), ("compile", 3.0), ("productive", 4.0), ("data_wait", 0.5),
                              ("productive", 4.0), ("checkpoint", 1.5), ("eval", 1.0)]:
        now[0] += seconds
        g.lap(category)
    f = g.fractions()
    assert f["productive"] == pytest.approx(8 / 16) and f["compile"] == pytest.approx(3 / 16)
    assert sum(f.values()) == pytest.approx(1.0)
    assert g.metrics()["goodput"] == f["productive"] and g.metrics()["wall_seconds"] == 16.0
    with pytest.raises(ValueError, match="unknown goodput category"):
        g.lap("lunch")


def test_run_profile_goodput_and_plot(tiny_overrides, tmp_path):
    cfg = load_config(overrides=tiny_overrides + [
        "run.name=obs", "train.steps=4", "run.log_every=1", "run.eval_every=4", "run.eval_batches=1",
        "checkpoint.every_steps=2", "train.profile_steps=[1,3]"])
    result = train(cfg)
    run_dir = tmp_path / "obs"
    traces = list((run_dir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    good = json.loads((run_dir / "goodput.json").read_text())
    assert sum(good[f"goodput_{k}"] for k in CATEGORIES) == pytest.approx(1.0, abs=1e-6)
    for k in ("productive", "compile", "checkpoint", "eval", "restart"):
        assert good[f"goodput_{k}"] > 0, k
    assert result.stats["goodput"]["goodput"] == good["goodput"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["goodput"] < 1 for r in records)

    # a second run overlaid with the first: same metrics, other directory name
    other = tmp_path / "obs2"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": r["loss"] + 1}) + "\n" for r in records))
    out = tmp_path / "plots" / "curves.png"
    assert cli_main(["plot", str(run_dir), str(other), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000


def test_plot_names_a_directory_without_metrics(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value", ["[3]", "[3,1]", "[-1,2]", "5"])
def test_profile_steps_must_be_a_range(value):
    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_config(overrides=[f"train.profile_steps={value}"])


def test_compile_cache_dir_receives_compiled_programs(tmp_path):
    """In a fresh process (this one's cache is already set up by conftest): programs land in the directory."""
    import os
    import subprocess
    import sys
    code = ("from maxmodel.train.profiling import enable_compile_cache; import sys; "
            "enable_compile_cache(sys.argv[1]); import jax, jax.numpy as jnp; "
            "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], check=True, env=env, timeout=120)
    assert any((tmp_path / "xla").iterdir())
