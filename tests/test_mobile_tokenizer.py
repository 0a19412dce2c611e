"""The C byte-level BPE (mobile/c/tokenizer.c) encodes exactly like `tokenizers` and decodes back to the text.

The tokenizer is trained here with the settings of train/tokenizer.py (ByteLevel pre-tokenizer, GPT-2 regex, no
prefix space, full byte alphabet). Texts: an embedded Shakespeare sample plus edge cases (always), and 200 kB of
the offline corpus when data/shakespeare is present.
"""

from __future__ import annotations

import pytest

from tests._mobile_util import ROOT, build_engine

SAMPLE = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;

HAMLET. To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die--to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. I'll, you've, they're, we'd, I'm, can't!
  ACT I. SCENE 2.   Elsinore. 1601, 42nd; 3.14159 -- [Exit.]
"""
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]  # train/chat.py's, ids 0..3
EDGE = [
    "<|user|>\nContinue HAMLET's speech:<|end|>\n<|assistant|>\n", "a<|end|>b <|endoftext|> c<|end|>", "<|user|>",
    "<|end|><|end|>  <|assist", "x <|user|> y",
    "", " ", "  ", "\n", "\n\n\nword", "a  b   c\t\td", "trailing space ", "x\r\ny", "''s'S 'LL 'll",
    "numbers 123456 1,000 3rd", "punct!!! ?? ... ---", "tabs\tand\u00a0nbsp", "café naïve Œdipus — “quoted” ‘single’",
    "emoji 🙂 and 中文 text", "mixed123abc456", "   leading", "end.\n", "$100.00 #hash @at",
]


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mobile.export import export_random

    build_engine()
    texts = [SAMPLE] * 3 + EDGE
    corpus = sorted((ROOT / "data" / "shakespeare" / "texts").glob("*_gut.txt"))
    held_out = ""
    if corpus:
        texts += [p.read_text(encoding="utf-8", errors="replace")[:100_000] for p in corpus[:3]]
        held_out = corpus[-1].read_text(encoding="utf-8", errors="replace")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, show_progress=False, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    path = export_random("tiny", d / "t.mmoe", n_layers=1, tokenizer_json=str(d / "tokenizer.json"))
    from mobile import Engine

    eng = Engine(path)
    yield tok, eng, held_out
    eng.close()


def test_merges_are_used(tok_model):
    tok, eng, _ = tok_model
    ids = eng.tokenize(SAMPLE)
    assert len(ids) < len(SAMPLE.encode()) / 2  # real merges, not bytes
    assert eng.eos_id == tok.token_to_id("<|endoftext|>")
    assert eng.is_stop(tok.token_to_id("<|end|>")) and eng.is_stop(eng.eos_id)
    assert not eng.is_stop(tok.token_to_id("<|user|>")) and not eng.is_stop(ids[0])


@pytest.mark.parametrize("i", range(len(EDGE) + 1))
def test_encode_matches_tokenizers(tok_model, i):
    tok, eng, _ = tok_model
    text = SAMPLE if i == len(EDGE) else EDGE[i]
    assert eng.tokenize(text) == tok.encode(text, add_special_tokens=False).ids
    assert eng.decode(eng.tokenize(text)) == text


def test_corpus_lines_match(tok_model):
    """Line by line (short sequences isolate any mismatch) over the held-out play when the corpus is present,
    else over the embedded sample repeated with variations."""
    tok, eng, held_out = tok_model
    text = held_out or (SAMPLE * 4).replace("the", "The  ")
    lines = text.splitlines(keepends=True)
    bad = [ln for ln in lines if eng.tokenize(ln) != tok.encode(ln, add_special_tokens=False).ids]
    assert not bad, f"{len(bad)} of {len(lines)} lines differ, first: {bad[0]!r}"
    big = text[:50_000]
    assert eng.tokenize(big) == tok.encode(big, add_special_tokens=False).ids
    assert eng.decode(eng.tokenize(big)) == big
