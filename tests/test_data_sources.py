"""Sources (JSONL/.gz, text, Parquet, globs and lists) and bad input: an error naming file and line, or a
counted skip (data.on_bad_record)."""
import gzip
import json

import numpy as np
import pytest
from conftest import TINY

from maxmodel.cli import main as cli_main
from maxmodel.config import ConfigError, load_config
from maxmodel.data.pipeline import make_train_data
from maxmodel.data.sources import DataError

DOCS = [f"Document number {i} talks about topic {i % 7} at some length. " * (1 + i % 3) for i in range(40)]


def cfg_for(tmp_path, *extra):
    return load_config(overrides=TINY + ["data.tokenizer=bytes", "data.shuffle=false", f"run.output_dir={tmp_path}",
                                         *extra])


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def first_rows(data, n=3):
    return np.concatenate([next(data.train)["inputs"] for _ in range(n)])


def test_jsonl_gz_text_parquet_globs_and_lists_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    write_jsonl(tmp_path / "a.jsonl", DOCS[:20])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in DOCS[20:]))
    write_jsonl(tmp_path / "b_plain.jsonl", DOCS[20:], field="body")
    ref = make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path={tmp_path}/a.jsonl"), tmp_path)
    assert ref.stats["jsonl.documents"] + 1 == 20  # one of 20 held out (eval_fraction 0.05)
    # A list mixing a plain and a gzipped file, with a custom field, reads identically.
    listed = make_train_data(cfg_for(tmp_path, "data.source=jsonl", "data.text_field=body",
                                     f"data.path=[{tmp_path}/b.jsonl.gz]"), tmp_path)
    plain = make_train_data(cfg_for(tmp_path, "data.source=jsonl", "data.text_field=body",
                                    f"data.path={tmp_path}/b_plain.jsonl"), tmp_path)
    np.testing.assert_array_equal(first_rows(listed), first_rows(plain))
    # Text files (one document each, matched by a glob) and Parquet give the same documents as JSONL.
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(DOCS[:20]):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    pq.write_table(pa.table({"text": DOCS[:20]}), tmp_path / "a.parquet")
    text = make_train_data(cfg_for(tmp_path, "data.source=text", f"data.path={tmp_path}/txt/*.txt"), tmp_path)
    par = make_train_data(cfg_for(tmp_path, "data.source=parquet", f"data.path={tmp_path}/a.parquet"), tmp_path)
    expected = first_rows(ref)
    np.testing.assert_array_equal(first_rows(text), expected)
    np.testing.assert_array_equal(first_rows(par), expected)
    assert ref.tokenizer.decode(expected[0]).startswith("Document number 0")


BAD_LINES = [
    (b'{"text": "fine"\n', "malformed JSON"),
    (b'{"text": "caf\xe9 latin-1"}\n', "not UTF-8"),
    (b'{"text": "   "}\n', "empty document"),
    (b'{"body": "no text field"}\n', "missing field 'text'"),
    (b'["a", "list"]\n', "expected a JSON object"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_jsonl_record_error_names_file_and_line(tmp_path, line, reason):
    good = "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:10]).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + line + good)  # the bad record is line 11
    with pytest.raises(DataError, match=rf"bad\.jsonl:11: {reason}"):
        make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path={path}"), tmp_path)
    data = make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path={path}", "data.on_bad_record=skip"),
                           tmp_path)
    report = data.stats["bad_records"]
    assert report["skipped"] == 1 and report["examples"][0].startswith(f"{path}:11: {reason}")
    assert data.stats["jsonl.documents"] == 19  # 20 good records, one held out for evaluation
    assert json.loads((tmp_path / "data_stats.json").read_text())["bad_records"]["skipped"] == 1


def test_bad_input_through_the_cli_exits_2_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n')
    args = ["train", *TINY, "data.tokenizer=bytes", f"run.output_dir={tmp_path}", "data.source=jsonl",
            f"data.path={path}"]
    assert cli_main(args) == 2
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err


def test_missing_files_and_truncated_gzip(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match="missing.jsonl"):
        make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path=[{tmp_path}/a.jsonl, {missing}]"),
                        tmp_path)
    with pytest.raises(ConfigError, match="matches no files"):
        make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path={tmp_path}/*.nothing"), tmp_path)
    data = make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path=[{tmp_path}/a.jsonl, {missing}]",
                                   "data.on_bad_record=skip"), tmp_path)
    assert data.stats["bad_records"]["by_reason"] == {"missing file": 1}
    blob = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: truncated or corrupt gzip"):
        make_train_data(cfg_for(tmp_path, "data.source=jsonl", f"data.path={tmp_path}/cut.jsonl.gz"), tmp_path)


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.packing"):
        cfg_for(tmp_path, "data.packing=greedy")
    with pytest.raises(ConfigError, match="data.source"):
        cfg_for(tmp_path, "data.source=csv")
    with pytest.raises(ConfigError, match="data.mixture"):
        cfg_for(tmp_path, "data.source=mixture")
    with pytest.raises(ConfigError, match=r"data.mixture.a.weight"):
        make_train_data(cfg_for(tmp_path, "data.source=mixture",
                                "data.mixture={a: {source: builtin, weight: -1}}"), tmp_path)
    with pytest.raises(ConfigError, match=r"data.mixture.a.sorce"):
        make_train_data(cfg_for(tmp_path, "data.source=mixture", "data.mixture={a: {sorce: builtin}}"), tmp_path)
