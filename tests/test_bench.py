"""`maxmodel bench` on a tiny config: the run succeeds and appends one complete result line."""
import json

from maxmodel.cli import main

TINY = ["model.vocab_size=256", "model.d_model=64", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=2", "model.d_ff=128", "train.batch_size=8", "train.seq_len=16",
        "data.source=synthetic"]  # on the 8 emulated devices of conftest


def test_bench_appends_result_line(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": 1}\n')  # appended to, never overwritten
    assert main(["bench", *TINY, "--steps", "3", "--warmup", "1", "--results", str(results)]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == {"earlier": 1}
    r = lines[1]
    assert r["steps"] == 3 and r["devices"] == 8 and r["platform"] == "cpu"
    assert r["tokens_per_sec"] > 0 and r["compile_seconds"] > 0 and 0 < r["mfu"] < 1
    assert r["step_time_median"] <= r["step_time_p90"]
    assert r["tokens_per_sec"] == 8 * 16 / r["step_time_median"]
    assert r["peak_memory_bytes"] > 10 << 20 and r["memory_source"] == "process peak RSS"
    assert len(r["revision"].split("+")[0]) == 40
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3


def test_bench_rejects_bad_steps(capsys):
    assert main(["bench", *TINY, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_step_profile_splits_step_time_into_matmuls_and_the_rest(capsys):
    import runpy
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_profile.py"
    sys.argv = [str(script), *TINY, "train.loss_chunk=8", "mesh.data=8", "run.cpu_devices=8", "--steps", "1",
                "--top", "3"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step ") and "tokens/s" in out[0]
    kinds = dict(part.strip().split(" ")[:2] for part in out[1].split(":", 1)[1].split(","))
    assert float(kinds["matmul"]) > 0 and float(kinds["other"]) > 0
    assert len(out) == 2 + 3  # the three largest ops


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu.sh has no GPU to run on here: its dry run takes the same two configs, shrunk, through
    `maxmodel bench` on the CPU, so a renamed key or a broken path shows up before GPU time is spent."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(repo / "benchmarks/gpu.sh")], env=env, capture_output=True, text=True,
                         timeout=600).stdout
    assert "failed" not in out, out
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["dense-1b", "moe-scaled"]
    assert all(r["tokens_per_sec"] > 0 for r in rows) and out.count("tokens/s") == 2
