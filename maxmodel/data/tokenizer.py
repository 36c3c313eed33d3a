"""Tokenizers for the default run: a sentencepiece BPE model trained on the corpus (cached), or raw bytes.

The full tokenizer interface (tiktoken, Hugging Face JSON) belongs to the data-pipeline work; this module
gives the trainer what it needs: encode, decode, vocab_size, bos/eos/pad ids.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

from maxmodel.config.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 so 0/1/2 can be pad/bos/eos."""
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path):
        import sentencepiece as spm
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def cache_dir() -> Path:
    root = os.environ.get("MAXMODEL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                              "maxmodel")
    return Path(root)


def train_sentencepiece(texts: list[str], vocab_size: int, out_path: Path, model_type: str = "bpe") -> Path:
    """Train a sentencepiece model (byte fallback on, pad=0 bos=1 eos=2 unk=3) and write it to out_path.
    No normalisation and whitespace kept as is, so code and indentation decode back exactly.
    Results are cached by content hash, so re-running on the same text costs nothing."""
    import sentencepiece as spm
    digest = hashlib.sha256(f"v2:{model_type}:{vocab_size}:".encode() + "\x00".join(texts).encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"spm-{model_type}-{vocab_size}-{digest}.model"
    if not cached.is_file():
        if vocab_size < 290:
            raise ConfigError("model.vocab_size", f"a sentencepiece vocabulary with byte fallback needs >= 290 "
                                                  f"entries, got {vocab_size}")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for t in texts for line in t.splitlines() if line.strip()),
            model_writer=model, vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            user_defined_symbols=["\n"], pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2,
            max_sentence_length=16384, minloglevel=2)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(model.getvalue())
        tmp.replace(cached)  # atomic: parallel test workers may train the same model
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not out_path.is_file():
        shutil.copyfile(cached, out_path)
    return out_path


def make_tokenizer(name: str, texts: list[str], vocab_size: int, run_dir: Path):
    """`spm` trains (or reuses) a model on `texts`; `bytes` is byte-level; otherwise a .model file path."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "spm":
        return SentencePieceTokenizer(train_sentencepiece(texts, vocab_size, run_dir / "tokenizer.model"))
    if Path(name).is_file():
        return SentencePieceTokenizer(name)
    raise ConfigError("data.tokenizer", f"'{name}' is neither 'spm', 'bytes' nor an existing .model file")
