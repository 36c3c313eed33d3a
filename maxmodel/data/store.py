"""Tokenized documents with random access: `lengths` (tokens per document) and `get(i) -> (tokens, weights)`.

Two stores: `MemoryStore` (documents tokenized at start-up: the built-in corpus, small raw sources) and
`ShardStore` (ArrayRecord shards written by `maxmodel data prepare`, read through grain's
ArrayRecordDataSource). Packing plans are made from `lengths` alone, so a process reads only the documents
of its own rows. Both pickle cheaply (grain worker processes get a copy; shards are reopened lazily there).

Shard format: one record per document, the int32 token ids followed (when the manifest's `fields` include
`weights`) by one uint8 loss weight per token; per-shard lengths in `<shard>.lengths.npy`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maxmodel.config.errors import ConfigError

from .sources import BadRecords, DataError

MANIFEST = "manifest.json"


def default_weights(n: int) -> np.ndarray:
    """Plain text: every token but BOS is a target."""
    w = np.ones(n, np.uint8)
    w[:1] = 0
    return w


class MemoryStore:
    def __init__(self, docs: list[tuple[np.ndarray, np.ndarray]]):
        lengths = np.fromiter((len(t) for t, _ in docs), np.int64, count=len(docs))
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.concatenate([t for t, _ in docs]) if docs else np.zeros(0, np.int32)
        self.weights = np.concatenate([w for _, w in docs]) if docs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.weights[a:b]


def manifest_path(entry: str) -> Path:
    p = Path(str(entry)).expanduser()
    return p / MANIFEST if p.is_dir() else p


def read_manifest(entry: str, key: str = "data.path") -> tuple[Path, dict]:
    path = manifest_path(entry)
    if not path.is_file():
        raise ConfigError(key, f"no {MANIFEST} at {path} (make shards with `maxmodel data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed manifest ({e})") from None
    if not manifest.get("complete"):
        raise DataError(f"{path}: preparation did not finish; rerun `maxmodel data prepare` to complete it")
    return path, manifest


class ShardStore:
    """The documents of one or more prepared directories (their shards in manifest order)."""

    def __init__(self, entries: list[str], bad: BadRecords, key: str = "data.path"):
        self.files: list[str] = []
        lengths, self.manifests = [], []
        self.has_weights = []
        for entry in entries:
            path, manifest = read_manifest(entry, key)
            self.manifests.append(manifest)
            for shard in manifest["shards"]:
                file = str(path.parent / shard["file"])
                n = self._check_shard(file, shard, bad)
                if n is None:
                    continue
                self.files.append(file)
                self.has_weights.append("weights" in manifest.get("fields", ["tokens"]))
                lengths.append(np.load(path.parent / shard["lengths_file"]).astype(np.int64))
        if not self.files:
            raise DataError(f"no readable shards in {', '.join(map(str, entries))}")
        self.shard_sizes = np.array([len(x) for x in lengths], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self.lengths = np.concatenate(lengths)
        self.bad_policy = bad.policy
        self._sources = None

    @staticmethod
    def _check_shard(file: str, shard: dict, bad: BadRecords) -> int | None:
        """Open the shard once: a missing, truncated or short file is reported here, not mid-run."""
        import grain
        if not Path(file).is_file():
            bad(file, "missing shard file", "missing file")
            return None
        try:
            n = len(grain.sources.ArrayRecordDataSource([file]))
        except RuntimeError as e:
            bad(file, f"truncated or corrupt ArrayRecord shard ({str(e).split(';')[0]})", "truncated shard")
            return None
        if n != shard["documents"]:
            bad(file, f"has {n} records, the manifest says {shard['documents']}", "truncated shard")
            return None
        return n

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sources"} | {"_sources": None}

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        import grain
        if self._sources is None:
            self._sources = [None] * len(self.files)
        s = int(np.searchsorted(self.shard_starts, i, side="right") - 1)
        if self._sources[s] is None:
            self._sources[s] = grain.sources.ArrayRecordDataSource([self.files[s]])
        local = int(i - self.shard_starts[s])
        n = int(self.lengths[i])
        raw = self._sources[s][local]
        expected = n * 5 if self.has_weights[s] else n * 4
        if len(raw) != expected:
            # Opening checked the shard; a wrong size here is corruption inside it. Never silently wrong.
            raise DataError(f"{self.files[s]}: record {local} has {len(raw)} bytes, expected {expected}")
        tokens = np.frombuffer(raw, np.int32, count=n)
        weights = np.frombuffer(raw, np.uint8, offset=4 * n) if self.has_weights[s] else default_weights(n)
        return tokens, weights

    def tokenizer_spec(self) -> dict:
        specs = {json.dumps(m["tokenizer"], sort_keys=True) for m in self.manifests}
        if len({json.loads(s)["id"] for s in specs}) > 1:
            raise ConfigError("data.path", "the prepared directories were tokenized with different tokenizers")
        return self.manifests[0]["tokenizer"]
