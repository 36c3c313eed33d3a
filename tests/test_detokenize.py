"""Incremental detokenizer: the pushed pieces + finish() equal decode(prompt + generated) after the prompt,
cut before the first stop string; nothing emitted is ever taken back (every running concatenation is a
prefix of the final text), so no partial stop string and no U+FFFD that later becomes a character comes out.
Checked on bytes, a sentencepiece model with byte fallback and a byte-level BPE (Hugging Face tokenizers)."""
from __future__ import annotations

import os
import random

import pytest

from maxmodel.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece_model,
)
from maxmodel.inference.detokenize import IncrementalDetokenizer

WORDS = ["the", "model", "reads", "a", "line", "of", "text", "and", "writes", "the", "next", "word",
         "while", "the", "data", "flows", "through", "layers", "of", "attention", "so", "every", "token",
         "sees", "what", "came", "before", "it"]
ODD = ["é", "ü", "日本", "語", "🙂", "—", "ß", "\n", "Q:", "  "]  # mostly unseen by the trained tokenizers


def generated_text(tok, prompt, gen):
    """decode(prompt + gen) after the prompt's text. A character the prompt leaves incomplete (random splits
    cut inside one) and the generated ids complete counts as generated text: where the texts diverge."""
    base = tok.decode(list(prompt))
    full = tok.decode(list(prompt) + list(gen))
    return full[len(os.path.commonprefix([base, full])):]


def reference(tok, prompt, gen, stop):
    """(expected output, index of the token at which a stop string appeared or None). Stop strings are
    looked for after every token, as a server does: the first to appear ends the text, which is cut before
    the earliest stop string present then (" read" starts first in " rea", but "ea" is the one there)."""
    for i in range(1, len(gen) + 1) if stop else ():
        text = generated_text(tok, prompt, gen[:i])
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            return text[:min(cuts)], i - 1
    return generated_text(tok, prompt, gen), None


def run(tok, prompt, gen, stop=()):
    """Push every token; check that nothing emitted is ever revised; return (pieces, detokenizer, the
    index of the token at which it stopped)."""
    want, _ = reference(tok, prompt, gen, stop)
    d = IncrementalDetokenizer(tok, prompt, list(stop))
    pieces, stopped_at = [], None
    for i, t in enumerate(gen):
        pieces.append(d.push(t))
        assert want.startswith("".join(pieces)), (pieces, want)
        if d.stopped and stopped_at is None:
            stopped_at = i
    pieces.append(d.finish())
    assert "".join(pieces) == want == d.text
    return pieces, d, stopped_at


def random_text(rng, n):
    return "".join(rng.choice(WORDS) + " " if rng.random() < 0.7 else rng.choice(ODD) for _ in range(n))


def random_stops(rng, text):
    """Substrings of the text (so they do occur, mostly across token boundaries) and strings that may not."""
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 6)])
        else:
            stops.append("".join(rng.choice("ab 日🙂\nQ:") for _ in range(rng.randint(1, 3))))
    return stops


def check_random_texts(tok, seed, cases=150, exact_stop_timing=True):
    rng = random.Random(seed)
    for _ in range(cases):
        ids = tok.encode(random_text(rng, rng.randint(1, 14)))
        cut = rng.randint(0, len(ids))
        prompt, gen = ids[:cut], ids[cut:]
        stops = random_stops(rng, tok.decode(ids)[len(tok.decode(prompt)):])
        _, d, stopped_at = run(tok, prompt, gen, stops)
        first = reference(tok, prompt, gen, stops)[1]
        assert d.stopped == (first is not None)
        if exact_stop_timing:
            assert stopped_at == first
        elif first is not None:  # a byte-level token can end inside a character: a stop may show a token late
            assert first <= stopped_at <= first + 1


def check_random_ids(tok, seed, lo, hi, cases=100):
    """Arbitrary id sequences (invalid UTF-8 included) after a real prompt decode exactly as a whole."""
    rng = random.Random(seed)
    for _ in range(cases):
        prompt = tok.encode(random_text(rng, rng.randint(0, 4)))
        run(tok, prompt, [rng.randrange(lo, hi) for _ in range(rng.randint(1, 30))])


# ------------------------------------------------------------------ bytes

def test_multibyte_characters_come_out_whole():
    tok = ByteTokenizer()
    text = "naïve 日本 🙂!"
    pieces, _, _ = run(tok, [], tok.encode(text))
    assert "\ufffd" not in "".join(pieces)
    emoji = text.index("🙂")
    assert pieces[len(text[:emoji].encode()):][:4] == ["", "", "", "🙂"]  # held until its 4th byte


def test_incomplete_sequence_at_the_end_is_what_decode_gives():
    tok = ByteTokenizer()
    gen = tok.encode("ok") + tok.encode("🙂")[:2]
    pieces, _, _ = run(tok, [], gen)
    assert pieces[:4] == ["o", "k", "", ""] and pieces[4] == tok.decode(gen)[2:] != ""


@pytest.mark.parametrize("text,stop,want", [
    ("The answer is 42.\nQ: what", ["\nQ:"], "The answer is 42."),
    ("a\nb\nQ c\nQ:d", ["\nQ:"], "a\nb\nQ c"),  # false starts are held, then released
    ("The answer is 42.", ["42", "answer"], "The "),  # the earliest occurrence wins
    ("x日本y", ["日本"], "x"),
    ("\nQ: at once", ["\nQ:"], ""),
    ("abcabd", ["abd", "bca"], "a"),
])
def test_stop_strings_spanning_tokens_are_cut_exactly(text, stop, want):
    tok = ByteTokenizer()
    gen = tok.encode(text)
    pieces, d, stopped_at = run(tok, tok.encode("prompt: "), gen, stop)
    assert "".join(pieces) == want and d.stopped and d.stop_string in stop
    assert stopped_at == reference(tok, [], gen, stop)[1]
    assert d.push(tok.encode("z")[0]) == "" and d.finish() == "" and d.text == want


def test_no_stop_string_found_releases_everything_at_finish():
    tok = ByteTokenizer()
    pieces, d, _ = run(tok, [], tok.encode("ends with \nQ"), ["\nQ:"])
    assert not d.stopped and pieces[-1] == "\nQ"  # held to the end, since ":" could still have come


def test_random_texts_and_stops_bytes():
    check_random_texts(ByteTokenizer(), seed=0, cases=300)


def test_random_ids_bytes():
    check_random_ids(ByteTokenizer(), seed=1, lo=3, hi=259, cases=200)


# ------------------------------------------------------------------ sentencepiece with byte fallback

@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    path = tmp_path_factory.mktemp("spm") / "byte_fallback.model"
    path.write_bytes(train_sentencepiece_model(lines, vocab_size=320))
    return SentencePieceTokenizer(path)


def test_sentencepiece_byte_fallback_characters_and_leading_space(spm_tok):
    ids = spm_tok.encode("the model writes 日本語 🙂 and é")
    cut = next(k for k in range(len(ids)) if spm_tok.decode(ids[:k]) == "the model")
    prompt, gen = ids[:cut], ids[cut:]  # gen starts with "▁writes": its space shows only after the prompt
    assert sum(spm_tok.sp.IsByte(i) for i in gen) >= 10  # the odd characters really are split into bytes
    pieces, _, _ = run(spm_tok, prompt, gen)
    assert "".join(pieces) == " writes 日本語 🙂 and é"
    assert "\ufffd" not in "".join(pieces)


def test_random_texts_and_stops_sentencepiece(spm_tok):
    check_random_texts(spm_tok, seed=2)


def test_random_ids_sentencepiece(spm_tok):
    check_random_ids(spm_tok, seed=3, lo=3, hi=spm_tok.vocab_size)


# ------------------------------------------------------------------ byte-level BPE (GPT-2 style)

@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    # odd characters in the corpus too, so some merged tokens hold part of a character's bytes
    lines = [random_text(rng, 12) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def test_random_texts_and_stops_byte_level_bpe(bpe_tok):
    check_random_texts(bpe_tok, seed=4, exact_stop_timing=False)


def test_random_ids_byte_level_bpe(bpe_tok):
    check_random_ids(bpe_tok, seed=5, lo=3, hi=bpe_tok.vocab_size)
