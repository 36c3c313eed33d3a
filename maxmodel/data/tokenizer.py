"""One tokenizer interface over sentencepiece models, tiktoken encodings, Hugging Face `tokenizers` JSON files
and raw bytes: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `mask_id` (the masked-LM
[MASK] token, None when the tokenizer has none) and `id` (a stable name for manifests: the kind plus a hash
of the file).

`data.tokenizer` chooses one: `spm` (a sentencepiece BPE model trained on the data, cached), `bytes`,
`tiktoken:<encoding name>` (tiktoken's registry; the BPE ranks must already be in tiktoken's cache, since
the package itself ships no rank files and we never download), or a file: `*.model` (sentencepiece),
`*.json` (Hugging Face tokenizers), `*.tiktoken` (a tiktoken BPE ranks file).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from maxmodel.config.errors import ConfigError

MASK_PIECE = "[MASK]"  # a user-defined piece of every sentencepiece model trained here (masked LM)
# GPT-2's pre-tokenisation pattern (from its paper release), for tiktoken ranks files without a name.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 so 0/1/2 can be pad/bos/eos; 259 is the mask token."""
    pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 259
    vocab_size = 260
    id = "bytes"
    path = None

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path):
        import sentencepiece as spm
        self.path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as e:
            raise ConfigError("data.tokenizer", f"cannot load sentencepiece model {model_path}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise ConfigError("data.tokenizer", f"{model_path} has no EOS piece; train it with eos_id set")
        self.bos_id = self.bos_id if self.bos_id >= 0 else self.eos_id
        self.pad_id = self.pad_id if self.pad_id >= 0 else self.eos_id
        mask = self.sp.piece_to_id(MASK_PIECE)  # unknown pieces map to unk: check the piece really is there
        self.mask_id = mask if self.sp.id_to_piece(mask) == MASK_PIECE else None
        self.id = f"spm:{_file_digest(self.path)}"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer:
    """A named tiktoken encoding, or a `.tiktoken` ranks file (GPT-2 pattern, `<|endoftext|>` and `<|pad|>`
    appended after the ranks). tiktoken has a single end-of-text token: it serves as BOS and EOS."""

    def __init__(self, name: str | None = None, ranks_file: str | Path | None = None):
        import tiktoken
        if ranks_file is not None:
            from tiktoken.load import load_tiktoken_bpe
            self.path = Path(ranks_file)
            try:
                ranks = load_tiktoken_bpe(str(ranks_file))
            except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
                raise ConfigError("data.tokenizer", f"cannot read tiktoken ranks file {ranks_file}: {e}") from None
            n = len(ranks)
            self.enc = tiktoken.Encoding(self.path.stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": n, "<|pad|>": n + 1})
            self.id = f"tiktoken-file:{_file_digest(self.path)}"
            self.pad_id = n + 1
        else:
            self.path = None
            try:
                self.enc = tiktoken.get_encoding(name)
            except ValueError as e:
                raise ConfigError("data.tokenizer", f"tiktoken has no encoding '{name}': {e}") from None
            except Exception as e:  # noqa: BLE001 - tiktoken fetches rank files over the network
                raise ConfigError("data.tokenizer", f"tiktoken encoding '{name}' is not in tiktoken's cache "
                                  f"(TIKTOKEN_CACHE_DIR) and cannot be fetched ({type(e).__name__}); "
                                  f"use a local .tiktoken ranks file instead") from None
            self.id = f"tiktoken:{name}"
            self.pad_id = self.enc.eot_token
        self.bos_id = self.eos_id = self.enc.eot_token
        self.mask_id = None  # tiktoken's encodings have no mask token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; BOS/EOS/pad found among the usual special-token spellings."""
    # BERT's WordPiece vocabularies: [CLS] opens and [SEP] closes a document, as in BERT's own inputs.
    BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>", "<|endoftext|>", "[CLS]")
    EOS = ("</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>", "[SEP]")
    PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
    MASK = ("[MASK]", "<mask>", "<|mask|>")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer
        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise ConfigError("data.tokenizer", f"cannot load Hugging Face tokenizer {path}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(self.EOS)
        if self.eos_id is None:
            raise ConfigError("data.tokenizer", f"{path} has none of the EOS tokens {', '.join(self.EOS)}")
        bos, pad = self._find(self.BOS), self._find(self.PAD)
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad
        self.mask_id = self._find(self.MASK)
        # The special ids are chosen here, not in the file: prepared shards made with other choices differ.
        self.id = f"hf:{_file_digest(self.path)}:{self.bos_id}-{self.eos_id}-{self.pad_id}"

    def _find(self, names) -> int | None:
        for name in names:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def cache_dir() -> Path:
    root = os.environ.get("MAXMODEL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                              "maxmodel")
    return Path(root)


def train_sentencepiece_model(lines: Iterable[str], vocab_size: int, model_type: str = "bpe",
                              key: str = "model.vocab_size") -> bytes:
    """Train a sentencepiece model (byte fallback on, pad=0 bos=1 eos=2 unk=3, then the newline
    and [MASK] pieces) on an iterator of lines.
    No normalisation and whitespace kept as is, so code and indentation decode back exactly."""
    import sentencepiece as spm
    if vocab_size < 290:
        raise ConfigError(key, f"a sentencepiece vocabulary with byte fallback needs >= 290 entries, got {vocab_size}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(line for line in lines if line.strip()), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            user_defined_symbols=["\n", MASK_PIECE],
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2, max_sentence_length=16384, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high" for a small corpus
        raise ConfigError(key, f"sentencepiece training failed: {e}") from None
    return model.getvalue()


def train_sentencepiece(texts: list[str], vocab_size: int, out_path: Path, model_type: str = "bpe") -> Path:
    """A model trained on `texts`, cached by content hash (re-running on the same text costs nothing)."""
    # v4: [MASK] became a user-defined piece (older cached models lack it)
    digest = hashlib.sha256(f"v4:{model_type}:{vocab_size}:".encode() + "\x00".join(texts).encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"spm-{model_type}-{vocab_size}-{digest}.model"
    if not cached.is_file():
        model = train_sentencepiece_model((line for t in texts for line in t.splitlines()), vocab_size, model_type)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(model)
        tmp.replace(cached)  # atomic: parallel test workers may train the same model
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not out_path.is_file():
        shutil.copyfile(cached, out_path)
    return out_path


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def copy_hf_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy the Hugging Face tokenizer files in a directory (or beside a tokenizer .json file, which becomes
    `tokenizer.json`) into out_dir: what transformers' AutoTokenizer reads."""
    directory = source if source.is_dir() else source.parent
    for name in HF_TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy(directory / name, out_dir / name)
    if source.is_file():
        shutil.copy(source, out_dir / "tokenizer.json")


def load_tokenizer(name: str):
    """A tokenizer that needs no training: `bytes`, `tiktoken:<name>` or a tokenizer file."""
    if name == "bytes":
        return ByteTokenizer()
    if name.startswith("tiktoken:"):
        return TiktokenTokenizer(name=name.split(":", 1)[1])
    path = Path(name)
    if not path.is_file():
        raise ConfigError("data.tokenizer", f"'{name}' is neither spm, bytes, tiktoken:<name> nor an existing "
                                            f"tokenizer file (.model, .json, .tiktoken)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer(ranks_file=path)
    return SentencePieceTokenizer(path)


def make_tokenizer(name: str, texts: list[str], vocab_size: int, run_dir: Path):
    """`spm` trains (or reuses) a model on `texts`; anything else is loaded by `load_tokenizer`."""
    if name == "spm":
        return SentencePieceTokenizer(train_sentencepiece(texts, vocab_size, run_dir / "tokenizer.model"))
    return load_tokenizer(name)
