"""`maxmodel plan fit`: recovering a known law from synthetic runs, CSV and run-directory input, plots."""
import csv
import json

import numpy as np
import pytest

from maxmodel.cli import main as cli_main
from maxmodel.planner.fit import fit_runs
from maxmodel.planner.laws import LAWS

TRUE = LAWS["chinchilla-3"]    # generating law: E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28


def synthetic_runs(noise=0.003, seed=0):
    """Four IsoFLOP budgets, seven sizes each from N_opt/8 to 8·N_opt, loss × exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in (1e18, 1e19, 1e20, 1e21):
        n0, _ = TRUE.optimal(c)
        for n in n0 * np.logspace(-0.9, 0.9, 7):
            d = c / (6 * n)
            runs.append({"params": n, "tokens": d, "flops": c,
                         "loss": TRUE.loss(n, d) * float(np.exp(rng.normal(0, noise)))})
    return runs


def write_csv(path, runs, columns=("params", "tokens", "loss", "flops")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in runs:
            w.writerow([r[c] for c in columns])


def test_fit_recovers_known_parameters():
    res = fit_runs(synthetic_runs(), bootstrap=20)
    p = res["parametric"]
    # Tolerances for 0.3% noise on 28 runs: exponents ±0.02, E ±0.05, the allocation exponent a ±0.01.
    assert p["alpha"] == pytest.approx(0.34, abs=0.02)
    assert p["beta"] == pytest.approx(0.28, abs=0.02)
    assert p["E"] == pytest.approx(1.69, abs=0.05)
    assert p["a"] == pytest.approx(TRUE.a, abs=0.01)
    lo, hi = p["ci"]["alpha"]
    assert lo < p["alpha"] < hi and hi - lo < 0.05
    n_true, _ = TRUE.optimal(res["allocation"]["flops"])
    assert res["allocation"]["params"] == pytest.approx(n_true, rel=0.15)
    # Approach 2 on the same runs: one vertex per budget, exponent close to the true a.
    iso = res["isoflop"]
    assert len(iso["budgets"]) == 4
    assert iso["a"] == pytest.approx(TRUE.a, abs=0.03)


def test_fit_cli_csv_json_and_plot(tmp_path, capsys):
    write_csv(tmp_path / "runs.csv", synthetic_runs())
    png = tmp_path / "iso.png"
    assert cli_main(["plan", "fit", str(tmp_path / "runs.csv"), "--bootstrap", "5", "--plot", str(png),
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["runs"] == 28 and res["parametric"]["alpha"] == pytest.approx(0.34, abs=0.02)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from maxmodel.planner.report import fit_table

    text = fit_table(res)
    assert "IsoFLOP" in text and "95% CI" in text and "alpha" in text


def test_fit_cli_bad_csv(tmp_path, capsys):
    write_csv(tmp_path / "bad.csv", synthetic_runs()[:6], columns=("params", "tokens", "flops"))
    assert cli_main(["plan", "fit", str(tmp_path / "bad.csv")]) == 2
    assert "missing column 'loss'" in capsys.readouterr().err
    (tmp_path / "neg.csv").write_text("params,tokens,loss\n1e8,2e9,3.1\n-1e8,2e9,3.0\n")
    assert cli_main(["plan", "fit", str(tmp_path / "neg.csv")]) == 2
    err = capsys.readouterr().err
    assert "neg.csv:3" in err and "'params'" in err
    assert cli_main(["plan", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_fit_from_run_directories(tmp_path, capsys):
    import yaml

    from maxmodel.config import load_config, to_dict
    from maxmodel.planner import count_params

    runs = synthetic_runs()[::4]
    dirs = []
    for i, r in enumerate(runs):
        cfg = load_config(overrides=[f"model.d_model={128 * (i + 1)}", "model.num_heads=2", "model.num_kv_heads=2",
                                     "model.d_ff=0", "model.head_dim=0", "train.batch_size=8", "train.seq_len=128"])
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        with open(d / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps({"step": step, "loss": r["loss"] + 1.0 / step, "lr": 1e-3}) + "\n" for step in (10, 20))
            fh.write(json.dumps({"step": 20, "eval_loss": r["loss"]}) + "\n")
        dirs.append(str(d))
    from maxmodel.planner.runs import read_run_dirs

    read = read_run_dirs(dirs)
    assert read[0]["tokens"] == 20 * 8 * 128 and read[0]["loss"] == runs[0]["loss"]
    assert read[1]["params"] == count_params(load_config(overrides=["model.d_model=256", "model.num_heads=2",
                                                                    "model.num_kv_heads=2", "model.d_ff=0",
                                                                    "model.head_dim=0"]).model)["total"]
    assert cli_main(["plan", "fit", "--from-runs", *dirs, "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == len(dirs)
    assert cli_main(["plan", "fit", "--from-runs", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
