"""Tokenizers: sentencepiece trained by `maxmodel tokenizer train`, tiktoken ranks files, HF tokenizers JSON."""
import base64

import pytest

from maxmodel.cli import main as cli_main
from maxmodel.config import ConfigError
from maxmodel.data.builtin import builtin_documents
from maxmodel.data.tokenizer import HFTokenizer, TiktokenTokenizer, load_tokenizer

SAMPLE = "def naïve(x):\n    return x  # café → ✓ 日本語\n\n\tTabs and  double  spaces stay."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(builtin_documents()[:60]))
    return path


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_train_cli_round_trip(corpus, tmp_path, capsys, kind):
    out = tmp_path / f"{kind}.model"
    assert cli_main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--type", kind,
                     "--output", str(out)]) == 0
    assert "400 pieces" in capsys.readouterr().out
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte fallback covers 日本語 even if unseen; whitespace kept
    assert len(ids) < len(SAMPLE.encode())  # it learned merges: fewer ids than bytes
    text = corpus.read_text()[:3000]
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_cli_errors(tmp_path, capsys):
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "400",
                     "--output", str(tmp_path / "x.model")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "100",
                     "--output", str(tmp_path / "x.model")]) == 2
    assert "--vocab-size" in capsys.readouterr().err


def _write_ranks(path, merges):
    """A tiktoken ranks file: the 256 single bytes, then `merges` (each formed from lower-ranked pieces)."""
    tokens = [bytes([b]) for b in range(256)] + [m.encode() for m in merges]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return {t: rank for rank, t in enumerate(tokens)}


def test_tiktoken_ranks_file(tmp_path, capsys):
    ranks = _write_ranks(tmp_path / "mini.tiktoken", ["th", "he", "the", " t", " th", " the", "in", "ing"])
    tok = load_tokenizer(str(tmp_path / "mini.tiktoken"))
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == 264 + 2 and tok.eos_id == tok.bos_id == 264 and tok.pad_id == 265
    ids = tok.encode("the thing")
    assert ids[0] == ranks[b"the"] and ranks[b" th"] in ids and ranks[b"ing"] in ids
    assert tok.decode(ids) == "the thing"
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert cli_main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "mini.tiktoken"), "the thing"]) == 0
    assert '"decoded": "the thing"' in capsys.readouterr().out


def test_tiktoken_named_encoding_needs_its_cached_ranks(tmp_path, monkeypatch):
    # tiktoken ships no rank files: a name works only when its ranks are cached (or downloadable).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    try:
        tok = load_tokenizer("tiktoken:cl100k_base")
    except ConfigError as e:
        assert e.key == "data.tokenizer" and "cache" in str(e)
    else:
        assert tok.vocab_size > 100_000 and tok.decode(tok.encode(SAMPLE)) == SAMPLE
    with pytest.raises(ConfigError, match="no encoding 'not_an_encoding'"):
        load_tokenizer("tiktoken:not_an_encoding")


def test_hf_tokenizers_json(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(hf, HFTokenizer)
    assert (hf.pad_id, hf.bos_id, hf.eos_id) == (0, 1, 2) and hf.vocab_size == 500
    assert hf.decode(hf.encode(SAMPLE)) == SAMPLE
    assert hf.id.startswith("hf:")


def test_hf_wordpiece_tokenizer_has_bert_specials(tmp_path, corpus):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train([str(corpus)], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    bert = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (bert.pad_id, bert.bos_id, bert.eos_id, bert.mask_id) == (0, 2, 3, 4)  # [CLS] text [SEP], as BERT's


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.model"))
