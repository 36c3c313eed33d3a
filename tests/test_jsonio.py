"""Every JSON file maxmodel writes parses with a strict (RFC 8259) reader: unknown values are null, never NaN."""
import json
import math

import numpy as np
import pytest

from maxmodel import jsonio
from maxmodel.cli import main as cli_main


def _refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str):
    """What jq / JavaScript / Go accept: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=_refuse)


def test_strict_reader_refuses_what_python_json_writes():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"x": math.nan}))


def test_unknown_values_become_null_and_numpy_becomes_plain():
    value = {"nan": math.nan, "inf": [np.float32(np.inf), -math.inf], "n": np.int64(3), "f": np.float64(0.5),
             "a": np.array([1.0, np.nan]), "b": np.bool_(True), "t": (1, "x")}
    assert strict_loads(jsonio.dumps(value)) == {"nan": None, "inf": [None, None], "n": 3, "f": 0.5,
                                                 "a": [1.0, None], "b": True, "t": [1, "x"]}
    with pytest.raises(TypeError):  # an object it cannot clean is an error, not a silent repr
        jsonio.dumps({"x": object()})


def test_files_of_a_real_run_and_export_are_strict_json(tiny_overrides, tmp_path, capsys):
    # log_every=1: the first logged step has no timed interval yet (tokens_per_sec, step_time, mfu unknown)
    # the default (builtin) corpus: its data_stats.json is written too
    assert cli_main(["train", *tiny_overrides, "data.source=builtin", "run.name=j", "train.steps=2", "run.log_every=1",
                     "run.eval_every=2", "run.eval_batches=1", "checkpoint.every_steps=2"]) == 0
    run_dir = tmp_path / "j"
    assert cli_main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [strict_loads(line) for line in lines]
    assert records[0]["step"] == 1 and records[0]["tokens_per_sec"] is None and records[0]["mfu"] is None
    assert records[1]["tokens_per_sec"] > 0 and math.isfinite(records[1]["loss"])
    names = {p.name for p in tmp_path.rglob("*")}
    assert {"metrics.jsonl", "goodput.json", "data_stats.json", "export.json"} <= names, names
    # every file Python's lenient reader takes as JSON (orbax's checkpoint metadata included) must also
    # pass the strict one
    checked = 0
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for doc in (text.splitlines() if path.suffix == ".jsonl" else [text]):
            try:
                json.loads(doc)
            except ValueError:
                continue
            strict_loads(doc)
            checked += 1
    assert checked > len(lines) + 3

    capsys.readouterr()
    assert cli_main(["plan", "--flops", "1e21", "--json"]) == 0
    assert strict_loads(capsys.readouterr().out)["allocation"]["tokens"] > 0
