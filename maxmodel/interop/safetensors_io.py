"""Reading a (possibly sharded) safetensors checkpoint one tensor at a time, and writing one in shards.

Reading opens every file with `safe_open` and fetches tensors by name, so only the tensors in use are in
memory. Writing fills one shard at a time (at most `max_shard_bytes` held) and ends with the index
`model.safetensors.index.json` that transformers reads, as save_pretrained writes it.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from maxmodel import jsonio
from maxmodel.config.errors import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Reader:
    """Tensors of a Hugging Face model directory by name, as numpy arrays."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).is_file():
            files = [SINGLE]
            weight_map = None
        else:
            raise ConfigError("DIR", f"{self.dir} has neither {SINGLE} nor {INDEX}")
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(safe_open(self.dir / f, framework="numpy")) for f in files}
        if weight_map is None:
            weight_map = {name: SINGLE for name in self._handles[SINGLE].keys()}  # noqa: SIM118 (a safe_open handle)
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise ConfigError("DIR", f"tensor {name!r} is missing from {self.dir}")
        return self._handles[self.weight_map[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


class ShardedWriter:
    """Accumulates tensors and flushes a shard whenever `max_shard_bytes` would be exceeded."""

    def __init__(self, directory: str | Path, max_shard_bytes: int):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []   # tensor names per written shard
        self.total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max:
            self._flush()
        self.pending[name] = np.ascontiguousarray(array)
        self.pending_bytes += array.nbytes
        self.total += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file
        save_file(self.pending, self.dir / f"part-{len(self.files):05d}.tmp", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards model-0000i-of-0000n.safetensors (one file: model.safetensors); write the index."""
        if self.pending:
            self._flush()
        n = len(self.files)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.dir / f"part-{i:05d}.tmp").rename(self.dir / name)
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self.files) for t in tensors}
            (self.dir / INDEX).write_text(jsonio.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        return names
