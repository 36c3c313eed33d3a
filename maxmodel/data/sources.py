"""Raw document sources: JSONL (optionally .gz), plain text files, Parquet and the built-in corpus.

Each reader yields `(document, where)`: the document is the text (format `text`) or the record's fields for
the supervised formats, and `where` names the file and line/row, so every bad record can be reported
precisely. `data.on_bad_record` decides what a bad record does: `error` raises a DataError naming it;
`skip` counts it by reason (reported in the data stats) and moves on.
"""
from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from maxmodel.config.errors import ConfigError

RAW_SOURCES = ("jsonl", "text", "parquet", "builtin")
CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {"prompt_completion": ("prompt", "completion"), "chat": ("messages",), "prompt": ("prompt",)}


class DataError(ConfigError):
    """Bad input data; the message starts with the file (and line) at fault. The CLI exits 2."""

    def __init__(self, message: str, key: str = "data.path"):
        self.key = key
        ValueError.__init__(self, message)


class BadRecords:
    """Applies `data.on_bad_record`: raise at the first bad record, or count them by reason."""

    def __init__(self, policy: str = "error"):
        self.policy = policy
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def __call__(self, where: str, reason: str, kind: str | None = None) -> None:
        if self.policy == "error":
            raise DataError(f"{where}: {reason} (set data.on_bad_record=skip to skip such records)")
        self.counts[kind or reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def merge(self, counts: dict, examples: list[str]) -> None:
        self.counts.update(counts)
        self.examples = (self.examples + examples)[:5]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict:
        return {"skipped": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}


def expand_paths(path, key: str = "data.path", bad: BadRecords | None = None) -> list[str]:
    """A file, a glob, or a list of them, as a sorted list of files (each glob's matches sorted)."""
    if path in (None, "", []):
        raise ConfigError(key, "no input given: set it to a file, a glob or a list of them")
    patterns = path if isinstance(path, (list, tuple)) else [path]
    files: list[str] = []
    for pattern in patterns:
        pattern = str(Path(str(pattern)).expanduser())
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(key, f"the glob '{pattern}' matches no files")
            files.extend(matches)
        elif Path(pattern).is_file():
            files.append(pattern)
        elif bad is not None and bad.policy == "skip":
            bad(pattern, "missing file")
        else:
            raise ConfigError(key, f"file not found: {pattern}")
    return files


def _take(record, fmt: str, text_field: str, where: str, bad: BadRecords):
    """The document a record holds in format `fmt`, or None (after reporting) when it is unusable."""
    if not isinstance(record, dict):
        bad(where, f"expected a JSON object, got {type(record).__name__}", "not an object")
        return None
    if fmt == "preference":  # pairs, ranked lists, unpaired or scored responses (preference.py)
        from .preference_records import take_record
        return take_record(record, where, bad)
    fields = FORMAT_FIELDS.get(fmt, (text_field,))
    for name in fields:
        if record.get(name) is None:
            bad(where, f"missing field '{name}'", f"missing field '{name}'")
            return None
    if fmt == "text":
        text = record[text_field]
        if not isinstance(text, str):
            bad(where, f"field '{text_field}' is {type(text).__name__}, not a string", "not a string")
            return None
        if not text.strip():
            bad(where, "empty document", "empty document")
            return None
        return text
    if fmt == "prompt":  # RL prompts: a string or a conversation; every other field goes to the rewards
        prompt = record["prompt"]
        chat = isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not chat:
            bad(where, "'prompt' must be a non-empty string or a list of {role, content} messages", "bad prompt")
            return None
        return dict(record)
    if fmt == "prompt_completion":
        if not all(isinstance(record[f], str) for f in fields):
            bad(where, "prompt and completion must be strings", "not a string")
            return None
        if not record["completion"].strip():
            bad(where, "empty completion", "empty document")
            return None
        return {"prompt": record["prompt"], "completion": record["completion"]}
    messages = record["messages"]
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        bad(where, "'messages' must be a non-empty list of {role, content} strings", "bad messages")
        return None
    unknown = sorted({m["role"] for m in messages} - set(CHAT_ROLES))
    if unknown:
        bad(where, f"unknown role {unknown[0]!r} (expected one of {', '.join(CHAT_ROLES)})", "unknown role")
        return None
    if not any(m["role"] == "assistant" for m in messages):
        bad(where, "no assistant message to train on", "empty document")
        return None
    return {"messages": messages}


def json_lines(file, bad: BadRecords) -> Iterator[tuple[object, str]]:
    """(parsed JSON value, "file:line") of every non-blank line of a JSONL file (optionally .gz); a line that
    is not UTF-8 or not JSON, or a corrupt gzip, goes to `bad` with its place."""
    file = str(file)
    opener = gzip.open if file.endswith(".gz") else open
    line_no = 0
    try:
        with opener(file, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{file}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    yield json.loads(raw.decode("utf-8")), where
                except UnicodeDecodeError as e:
                    bad(where, f"not UTF-8 ({e.reason} at byte {e.start})", "not UTF-8")
                except json.JSONDecodeError as e:
                    bad(where, f"malformed JSON ({e.msg} at column {e.colno})", "malformed JSON")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        bad(f"{file}:{line_no + 1}", f"truncated or corrupt gzip ({e})", "corrupt file")


def read_jsonl(file: str, fmt: str, text_field: str, bad: BadRecords) -> Iterator[tuple[object, str]]:
    for record, where in json_lines(file, bad):
        doc = _take(record, fmt, text_field, where, bad)
        if doc is not None:
            yield doc, where


def read_text(file: str, fmt: str, text_field: str, bad: BadRecords) -> Iterator[tuple[object, str]]:
    """A plain text file is one document."""
    if fmt != "text":
        raise ConfigError("data.format", f"plain text files hold format 'text', not '{fmt}'")
    raw = Path(file).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        bad(f"{file}:{line}", f"not UTF-8 ({e.reason} at byte {e.start})", "not UTF-8")
        return
    if not text.strip():
        bad(file, "empty document", "empty document")
        return
    yield text, file


def read_parquet(file: str, fmt: str, text_field: str, bad: BadRecords) -> Iterator[tuple[object, str]]:
    import pyarrow.parquet as pq
    if fmt == "preference":
        raise ConfigError("data.source", "preference records are read from jsonl files")
    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for bad files
        bad(file, f"not a readable Parquet file ({e})", "corrupt file")
        return
    fields = FORMAT_FIELDS.get(fmt, (text_field,))
    missing = [f for f in fields if f not in pf.schema_arrow.names]
    if missing:
        bad(file, f"missing field '{missing[0]}' (columns: {', '.join(pf.schema_arrow.names)})",
            f"missing field '{missing[0]}'")
        return
    row = 0
    for batch in pf.iter_batches(columns=list(fields), batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            doc = _take(record, fmt, text_field, f"{file}:row {row}", bad)
            if doc is not None:
                yield doc, f"{file}:row {row}"


READERS = {"jsonl": read_jsonl, "text": read_text, "parquet": read_parquet}


def read_documents(source: str, path, fmt: str, text_field: str, bad: BadRecords,
                   files: list[str] | None = None) -> Iterator[tuple[object, str]]:
    """All documents of a raw source, in file order (or of `files`, a subset of its expanded paths)."""
    if source == "builtin":
        from .builtin import builtin_documents
        if fmt != "text":
            raise ConfigError("data.format", f"the built-in corpus is format 'text', not '{fmt}'")
        for i, doc in enumerate(builtin_documents()):
            yield doc, f"builtin:{i}"
        return
    if source not in READERS:
        raise ConfigError("data.source", f"'{source}' is not a raw document source ({', '.join(RAW_SOURCES)})")
    for file in files if files is not None else expand_paths(path, bad=bad):
        yield from READERS[source](file, fmt, text_field, bad)
