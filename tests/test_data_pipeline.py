"""The grain pipeline: exact resume in a new process (packing, mixtures, worker processes), the multi-host
split (2 processes x 2 devices), mixture proportions, and the trainer fed from JSONL with data-wait logged."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from maxmodel.config import load_config
from maxmodel.data.pipeline import make_train_data
from maxmodel.data.prepare import prepare

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "JAX_PLATFORMS": "cpu"}


def docs(tag: str, n: int) -> list[str]:
    """Every word names its document and place, so no two rows are alike."""
    return [" ".join(f"{tag}{i}.{j}" for j in range(2 + i % 13)) for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for tag in ("alpha", "beta"):
        (root / f"{tag}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(tag, 120)))
    cfg = load_config(overrides=TINY + ["data.tokenizer=bytes", "data.source=jsonl",
                                        f"data.path={root}/beta.jsonl"])
    prepare(cfg, root / "beta_shards", workers=1, progress=False)
    return root


def overrides(root, tmp_path, *extra):
    return TINY + ["data.tokenizer=bytes", f"run.output_dir={tmp_path}", "train.steps=40", *extra]


def run_worker(mode: str, spec: dict, out: Path, wait: bool = True):
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(HERE / "data_worker.py"), mode, str(spec_file), str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return np.load(out)


def mixture_args(root):
    mixture = (f"{{a: {{source: jsonl, path: {root}/alpha.jsonl, weight: 3}}, "
               f"b: {{source: arrayrecord, path: {root}/beta_shards, weight: 1}}}}")
    return ["data.source=mixture", f"data.mixture={mixture}"]


@pytest.mark.parametrize("case", ["first_fit", "concat", "mixture"])
def test_resume_in_a_new_process_continues_exactly(inputs, tmp_path, case):
    extra = mixture_args(inputs) + ["data.packing=first_fit"] if case == "mixture" else \
        ["data.source=jsonl", f"data.path={inputs}/alpha.jsonl", f"data.packing={case}"]
    ovr = overrides(inputs, tmp_path, *extra)
    data = make_train_data(load_config(overrides=ovr), tmp_path)
    for _ in range(3):
        next(data.train)
    state = json.dumps(data.train.get_state())  # what the checkpoint stores (orbax JsonSave)
    expected = [next(data.train) for _ in range(2)]
    got = run_worker("resume", {"overrides": ovr, "run_dir": str(tmp_path), "state": state, "batches": 2},
                     tmp_path / "resumed.npz")
    for i, batch in enumerate(expected):
        for k, v in batch.items():
            np.testing.assert_array_equal(got[f"{i}_{k}"], v, err_msg=f"batch {i} key {k}")


def test_worker_processes_prefetch_and_resume(inputs, tmp_path):
    ovr = overrides(inputs, tmp_path, "data.source=jsonl", f"data.path={inputs}/alpha.jsonl",
                    "data.packing=first_fit")
    plain = make_train_data(load_config(overrides=ovr), tmp_path)
    reference = [next(plain.train) for _ in range(4)]
    workers = make_train_data(load_config(overrides=ovr + ["data.workers=1", "data.prefetch=2"]), tmp_path)
    for i in range(2):
        np.testing.assert_array_equal(next(workers.train)["inputs"], reference[i]["inputs"])
    state = json.loads(json.dumps(workers.train.get_state()))
    restored = make_train_data(load_config(overrides=ovr + ["data.workers=1", "data.prefetch=2"]), tmp_path)
    restored.train.set_state(state)
    np.testing.assert_array_equal(next(restored.train)["inputs"], reference[2]["inputs"])


def test_mixture_follows_weights_and_reports_them(inputs, tmp_path):
    data = make_train_data(load_config(overrides=overrides(inputs, tmp_path, *mixture_args(inputs))), tmp_path)
    assert data.stats["mixture.realised"] == pytest.approx({"a": 0.75, "b": 0.25}, abs=0.01)
    rows = np.concatenate([next(data.train)["inputs"] for _ in range(16)])  # 128 rows of 32 tokens
    text = [data.tokenizer.decode(r) for r in rows]
    share_a = np.mean(["alpha" in t for t in text])
    assert 0.65 < share_a < 0.85 and not any(("alpha" in t) and ("beta" in t) for t in text)
    again = make_train_data(load_config(overrides=overrides(inputs, tmp_path, *mixture_args(inputs))), tmp_path)
    np.testing.assert_array_equal(next(again.train)["inputs"], rows[:8])  # deterministic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("multiprocess")
def test_two_processes_read_disjoint_halves_of_the_global_batch(inputs, tmp_path):
    ovr = overrides(inputs, tmp_path, *mixture_args(inputs), "data.packing=first_fit")
    single = make_train_data(load_config(overrides=ovr), tmp_path)
    expected = [next(single.train)["inputs"] for _ in range(2)]
    port = free_port()
    procs = [run_worker("multihost", {"overrides": ovr, "run_dir": str(tmp_path), "batches": 2, "port": port,
                                      "process_id": p}, tmp_path / f"host{p}.npz", wait=False) for p in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    hosts = [np.load(tmp_path / f"host{p}.npz") for p in range(2)]
    for b in range(2):
        local = [h["local"][b] for h in hosts]
        assert all(len(rows) == 4 for rows in local)  # each process reads only its half
        union = sorted(r.tobytes() for rows in local for r in rows)
        assert len(set(union)) == len(union) == 8  # no row read twice
        assert union == sorted(r.tobytes() for r in expected[b])  # exactly the single-process global batch
        # The assembled global array (make_array_from_process_local_data) holds the same rows on both.
        for h in hosts:
            assert sorted(r.tobytes() for r in h["gathered"][b]) == union


def test_trainer_runs_on_packed_jsonl_and_logs_data_wait(inputs, tmp_path):
    from maxmodel.train.loop import train
    ovr = overrides(inputs, tmp_path, "data.source=jsonl", f"data.path={inputs}/alpha.jsonl",
                    "data.packing=first_fit", "train.steps=3", "run.log_every=1", "checkpoint.enabled=false",
                    "run.eval_every=3", "run.eval_batches=1", "run.name=j")
    result = train(load_config(overrides=ovr))
    records = [json.loads(line) for line in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 <= r["data_wait"] < 1 for r in records[1:]) and np.isfinite(result.eval_loss)
    assert result.stats["jsonl.packed_efficiency"] > 0.5
