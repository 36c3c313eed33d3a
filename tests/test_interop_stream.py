"""Streaming conversion (maxmodel/interop/orbax_stream.py): exact both ways, one stored chunk per layer,
the peak-memory benchmark runs, and a bad checkpoint leaves --out empty. No transformers needed: the HF
checkpoint is written by the benchmark's own LLaMA writer."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from maxmodel.config.errors import ConfigError
from maxmodel.interop import convert
from maxmodel.interop.orbax_stream import open_lazy, read
from maxmodel.interop.safetensors_io import Reader

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "convert_memory.py"))
TINY = ["--layers", "3", "--hidden", "16", "--ffn", "32", "--vocab", "64", "--heads", "2"]


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    reader = Reader(directory)
    try:
        return {name: reader.get(name) for name in reader.weight_map}
    finally:
        reader.close()


def test_benchmark_round_trip_is_exact_and_stores_a_layer_per_chunk(tmp_path, capsys):
    result = BENCH["main"]([*TINY, "--shard-gb", "0.00001", "--out", str(tmp_path)])  # ~10 KB: several shards
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    source, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(source) == sorted(back) and len(source) == 2 + 3 * 9 + 1
    for name, value in source.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    for step in ("imports", "from_hf", "to_hf"):
        assert result[step]["peak_rss_gib"] > 0 and result[step]["peak_anon_gib"] > 0
    assert "of the checkpoint" in capsys.readouterr().out

    stores = open_lazy(tmp_path / "init" / "params")
    wq = stores["layers"]["attn"]["wq"]["value"]
    assert wq.shape == (3, 16, 2, 8) and wq.chunk_layout.read_chunk.shape == (1, 16, 2, 8)
    np.testing.assert_array_equal(read(wq, (1,)).reshape(16, 16).T, source["model.layers.1.self_attn.q_proj.weight"])


def test_from_hf_shape_mismatch_names_the_tensor_and_leaves_out_empty(tmp_path):
    BENCH["write_checkpoint"](tmp_path / "hf", layers=2, hidden=16, ffn=32, vocab=64, heads=2)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    out = tmp_path / "init"
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.gate_proj\.weight makes a \(16, 32\) slice.*asks for \(16, 48\)"):
        convert.from_hf(str(tmp_path / "hf"), str(out))
    assert not out.exists() or not any(out.iterdir())  # the same --out can be used again


def test_from_hf_reports_left_out_tensors_but_not_buffers(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file
    hf = tmp_path / "hf"
    BENCH["write_checkpoint"](hf, layers=1, hidden=16, ffn=32, vocab=64, heads=2)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # a buffer, not a weight
    tensors["model.layers.0.adapter.weight"] = np.ones((2, 2), np.float32)
    save_file(tensors, hf / "model.safetensors")
    with caplog.at_level("WARNING", logger="maxmodel.convert"):
        convert.from_hf(str(hf), str(tmp_path / "init"))
    assert "no place for them: model.layers.0.adapter.weight (1 of" in caplog.text
    assert "inv_freq" not in caplog.text


def test_to_hf_failing_at_the_end_leaves_out_empty(tmp_path, monkeypatch):
    BENCH["write_checkpoint"](tmp_path / "hf", layers=1, hidden=16, ffn=32, vocab=64, heads=2)
    convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "init"))
    out = tmp_path / "back"

    def disk_full(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(convert, "copy_hf_tokenizer", disk_full)  # after the shards and config.json
    with pytest.raises(OSError, match="No space"):
        convert.to_hf(str(tmp_path / "init"), str(out), max_shard_bytes=2_000)
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    convert.to_hf(str(tmp_path / "init"), str(out), max_shard_bytes=2_000)  # the same command, run again
    assert (out / "model.safetensors.index.json").is_file()
