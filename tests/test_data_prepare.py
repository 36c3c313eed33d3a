"""`maxmodel data prepare`: ArrayRecord shards + manifest, parallel workers, rerun skips finished shards,
shards train identically to the raw source, truncated shards are reported."""
import json

import numpy as np
import pytest
from conftest import TINY

from maxmodel.cli import main as cli_main
from maxmodel.config import load_config
from maxmodel.data.pipeline import make_train_data
from maxmodel.data.prepare import prepare
from maxmodel.data.sources import DataError

DOCS = [f"Record {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(60)]


def write_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        (src / f"part{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[k::3]))
    return src


def overrides(tmp_path, *extra):
    return TINY + ["data.tokenizer=bytes", f"run.output_dir={tmp_path}", *extra]


def test_prepare_parallel_manifest_resume_and_identical_batches(tmp_path, capsys):
    src = write_inputs(tmp_path)
    out = tmp_path / "shards"
    raw = overrides(tmp_path, "data.source=jsonl", f"data.path={src}/*.jsonl", "data.packing=first_fit")
    assert cli_main(["data", "prepare", *raw, "--output", str(out), "--workers", "2", "--json",
                     "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["shards"] == 3 and manifest["last_run"]["workers"] == 2
    assert manifest["documents"] == len(DOCS)
    assert manifest["tokens"] == sum(len(d.encode()) + 2 for d in DOCS)  # bytes + BOS + EOS
    assert manifest["tokenizer"]["id"] == "bytes" and len(manifest["source_hash"]) == 64
    assert [s["documents"] for s in manifest["shards"]] == [20, 20, 20]

    # The shards train exactly like the raw JSONL they came from.
    from_raw = make_train_data(load_config(overrides=raw), tmp_path)
    from_shards = make_train_data(load_config(overrides=overrides(
        tmp_path, "data.source=arrayrecord", f"data.path={out}", "data.packing=first_fit")), tmp_path)
    for _ in range(3):
        a, b = next(from_raw.train), next(from_shards.train)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

    # A rerun skips every finished shard; a changed input redoes only its own shard.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrayrecord")}
    again = prepare(load_config(overrides=raw), out, workers=1, progress=False)
    assert again["last_run"]["shards_skipped"] == 3 and again["last_run"]["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.arrayrecord")} == mtimes
    with open(src / "part1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    third = prepare(load_config(overrides=raw), out, workers=1, progress=False)
    assert third["last_run"]["shards_written"] == 1 and third["documents"] == len(DOCS) + 1
    assert out.joinpath("shard-00001.arrayrecord").stat().st_mtime_ns != mtimes["shard-00001.arrayrecord"]


def test_prepare_supervised_and_truncated_shard(tmp_path):
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(40)))
    out = tmp_path / "sft"
    prepare(load_config(overrides=overrides(tmp_path, "data.source=jsonl", f"data.path={src}",
                                            "data.format=prompt_completion")), out, workers=1, progress=False)
    assert json.loads((out / "manifest.json").read_text())["fields"] == ["tokens", "weights"]
    data = make_train_data(load_config(overrides=overrides(tmp_path, "data.source=arrayrecord", f"data.path={out}",
                                                           "data.packing=first_fit", "data.shuffle=false")),
                           tmp_path)
    batch = next(data.train)
    learned = data.tokenizer.decode(batch["targets"][0][batch["loss_mask"][0] > 0])
    assert learned.startswith(" A0.") and "Q" not in learned  # only completions carry loss

    # Two prepared directories; one shard truncated afterwards.
    src2 = write_inputs(tmp_path)
    good, broken = tmp_path / "good", tmp_path / "broken"
    for directory, path in ((good, f"{src2}/part0.jsonl"), (broken, f"{src2}/part1.jsonl")):
        prepare(load_config(overrides=overrides(tmp_path, "data.source=jsonl", f"data.path={path}")), directory,
                workers=1, progress=False)
    shard = broken / "shard-00000.arrayrecord"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    both = f"data.path=[{good}, {broken}]"
    with pytest.raises(DataError, match=r"broken/shard-00000\.arrayrecord: truncated or corrupt"):
        make_train_data(load_config(overrides=overrides(tmp_path, "data.source=arrayrecord", both)), tmp_path)
    data = make_train_data(load_config(overrides=overrides(tmp_path, "data.source=arrayrecord", both,
                                                           "data.on_bad_record=skip")), tmp_path)
    assert data.stats["bad_records"]["by_reason"] == {"truncated shard": 1}
    assert data.stats["arrayrecord.documents"] == 19  # only the good directory's 20 (one held out)


def test_prepare_cli_usage_errors(tmp_path, capsys):
    assert cli_main(["data", "prepare", *overrides(tmp_path, "data.source=mixture",
                                                   "data.mixture={a: {source: builtin}}"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "data.source" in capsys.readouterr().err
    assert cli_main(["data", "prepare", *overrides(tmp_path, "data.source=jsonl", "data.path=/no/such.jsonl"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "/no/such.jsonl" in capsys.readouterr().err
