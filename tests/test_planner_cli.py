"""`maxmodel plan` end to end: JSON/table output, bad input, speed, emitted configs, --compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import load_config
from maxmodel.planner import count_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def plan_json(capsys, *args):
    assert cli_main(["plan", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)          # exactly one JSON object: json.loads rejects trailing text


def test_json_is_one_object_and_table_is_readable(capsys):
    p = plan_json(capsys, "--flops", "5.76e23")
    assert p["allocation"]["params"] == pytest.approx(3.22e10, rel=0.005)
    assert p["flops"]["ratio"] == pytest.approx(p["flops"]["appendix_f"] / p["flops"]["6ND"])
    assert abs(p["shape"]["error"]) <= 0.02
    assert cli_main(["plan", "--flops", "5.76e23"]) == 0
    text = capsys.readouterr().out
    for word in ("allocation", "shape", "FLOPs", "ratio App. F / 6ND", "config"):
        assert word in text


def test_chips_days_budget_time_and_cost(capsys):
    p = plan_json(capsys, "--chip", "v5p", "--chips", "256", "--days", "30", "--mfu", "0.45",
                  "--price-per-chip-hour", "4.2")
    assert p["budget"]["flops"] == pytest.approx(256 * 459e12 * 0.45 * 30 * 86400)
    assert p["time"]["days"] == pytest.approx(30, rel=0.02)           # the shape is within 2% of N
    assert p["time"]["cost"] == pytest.approx(p["time"]["chip_hours"] * 4.2)
    assert p["layout"]["fits"] and p["config"]["mesh"] == p["layout"]["chosen"]["mesh"]
    mesh = p["config"]["mesh"]
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["stage"] == 256


def test_deadline_gives_chips(capsys):
    p = plan_json(capsys, "--flops", "1e23", "--chip", "h100", "--deadline-days", "20", "--mfu", "0.4")
    chips = p["chips_for_deadline"]["chips"]
    assert p["time"]["days"] <= 20 and chips * 989e12 * 0.4 * 20 * 86400 >= p["flops"]["6ND"]
    assert (chips - 1) * 989e12 * 0.4 * 20 * 86400 < p["flops"]["6ND"]


def test_fixed_params_or_tokens(capsys):
    p = plan_json(capsys, "--flops", "1e22", "--params", "1B")
    assert p["allocation"]["tokens"] == pytest.approx(1e22 / 6e9)
    p = plan_json(capsys, "--params", "7B", "--tokens", "2T")
    assert p["budget"]["flops"] == pytest.approx(6 * 7e9 * 2e12)
    p = plan_json(capsys, "--params", "7B", "--law", "chinchilla-1")
    assert p["allocation"]["tokens_per_param"] == pytest.approx(20, rel=0.1)   # Table 3: ~20 tokens/param


def test_unique_tokens_and_inference(capsys):
    p = plan_json(capsys, "--flops", "1e22", "--unique-tokens", "20B")
    assert p["data_constrained"]["epochs"] > 1 and p["allocation"]["params"] == p["data_constrained"]["params"]
    # --unique-tokens alone: the paper's own jointly fitted law; the allocation's loss is the constrained one
    assert p["law"]["name"] == "muennighoff" and "15.387756" in p["data_constrained"]["source"]
    assert p["allocation"]["loss"] == pytest.approx(p["data_constrained"]["loss"])
    # an explicit base law wins and is combined with the printed, rounded decay constants
    c3 = plan_json(capsys, "--flops", "1e22", "--unique-tokens", "20B", "--law", "chinchilla-3")
    assert c3["law"]["name"] == "chinchilla-3" and "R_D*=15.4," in c3["data_constrained"]["source"]
    assert plan_json(capsys, "--flops", "1e22")["law"]["name"] == "chinchilla-3"   # unconstrained default
    p = plan_json(capsys, "--flops", "1e22", "--inference-tokens", "10T")
    assert p["inference"]["flops_saved"] > 0
    assert p["allocation"]["params"] < p["inference"]["chinchilla"]["params"]


@pytest.mark.parametrize("args,flag", [
    (["--flops", "-1e21"], "--flops"),
    (["--flops", "abc"], "--flops"),
    (["--chip", "tpu9", "--chips", "8", "--days", "1"], "--chip"),
    (["--chip", "v5p", "--chips", "8", "--days", "1", "--mfu", "1.5"], "--mfu"),
    (["--chip", "v5p", "--chips", "-8", "--days", "1"], "--chips"),
    (["--flops", "1e21", "--law", "nope"], "--law"),
    ([], "--flops"),
    (["--flops", "1e21", "--chips", "8"], "--chip"),
])
def test_bad_input_exits_2_naming_the_flag(capsys, args, flag):
    assert cli_main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err


def test_plan_answers_in_under_a_second():
    # Acceptance: `maxmodel plan` answers in under a second (a fresh interpreter, end to end). Counted in CPU
    # seconds of the child process, which is its wall time on an idle machine and does not depend on what
    # else the (shared, 2-core) test machine is running.
    import resource
    cmd = [sys.executable, "-m", "maxmodel.cli", "plan", "--chip", "v5p", "--chips", "256", "--days", "30",
           "--json"]
    subprocess.run(cmd, env=ENV, capture_output=True, check=True)      # warm the file cache
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert res.returncode == 0, res.stderr
    assert cpu < 1.0, f"took {cpu:.2f} CPU seconds"
    assert "jax" not in subprocess.run(
        [sys.executable, "-c", "import sys, maxmodel.planner.cli, maxmodel.planner.plan; print(sorted(sys.modules))"],
        env=ENV, capture_output=True, text=True, check=True).stdout


TINY = ["--flops", "1e15", "--vocab", "512", "--seq-len", "128"]


def test_write_config_loads_and_is_consistent(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    p = plan_json(capsys, *TINY, "--write-config", str(out))
    cfg = load_config(out)
    n = count_params(cfg.model)["total"]
    assert abs(n - p["allocation"]["params"]) / p["allocation"]["params"] <= 0.02
    assert cfg.model.vocab_size == 512 and cfg.train.seq_len == 128 <= cfg.model.max_seq_len
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    assert p["allocation"]["tokens"] <= tokens < p["allocation"]["tokens"] + cfg.train.batch_size * 128
    assert cfg.optimizer.schedule == "cosine" and 0 < cfg.optimizer.lr < 0.01
    assert cfg.optimizer.warmup_steps < cfg.train.steps
    assert out.read_text().startswith("# Written by `maxmodel plan")


def test_written_mesh_loads(tmp_path, capsys):
    out = tmp_path / "pod.yaml"
    plan_json(capsys, "--chip", "v5p", "--chips", "64", "--days", "7", "--write-config", str(out))
    cfg = load_config(out)
    assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor * cfg.mesh.stage == 64
    assert cfg.train.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0


@pytest.mark.skipif(not (ROOT / "maxmodel" / "train" / "cli.py").is_file(),
                    reason="the trainer (maxmodel/train/cli.py) is not on this branch yet")
def test_emitted_config_trains_for_a_step(tmp_path):
    out = tmp_path / "plan.yaml"
    subprocess.run([sys.executable, "-m", "maxmodel.cli", "plan", *TINY, "--write-config", str(out)],
                   env=ENV, check=True, capture_output=True)
    # Only run-length and placement overrides: the emitted 256 × 128 bf16 batch is kept small here because
    # one such step takes minutes on a 2-core CPU; the emitted model shape, optimizer and schedule are used as is.
    res = subprocess.run([sys.executable, "-m", "maxmodel.cli", "train", str(out), "train.steps=1",
                          "train.batch_size=8", "run.cpu_devices=1", f"run.output_dir={tmp_path / 'runs'}", "data.source=synthetic",
                          "checkpoint.enabled=false"], env=ENV, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
