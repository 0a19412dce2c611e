"""Tokenizers for training.

The embedded default trains a byte-level BPE on its training split: the standard ByteLevel pre-tokenizer
(GPT-2 regex, no prefix space) + ByteLevel decoder, nothing else (no normalizer, no post-processor), so a C
encoder can reproduce it from tokenizer.json alone. Special tokens (train/chat.py) get ids 0..n-1 in order.
Real-data sizes load a named pretrained tokenizer file (`tokenizer.json`) instead. prepare_tokenizer makes the
run's tokenizer.json from the recipe's `[tokenizer]` table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import cli
from train.chat import SPECIAL_TOKENS, special_ids
from train.data import DataError, iter_source, shakespeare_splits, take_chars

if TYPE_CHECKING:
    from train.recipe_config import Recipe


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE with `vocab_size` entries (256 byte symbols + special tokens + merges). Deterministic."""
    if vocab_size < 256 + len(special_tokens) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE "
                         f"(needs > 256 + {len(special_tokens)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Atomic write of tokenizer.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p}: not a valid tokenizer.json ({e})") from e


def encode_texts(tok: Tokenizer, texts: list[str], eos_id: int | None) -> list[int]:
    """Concatenate the token ids of each text, each followed by eos_id (when given)."""
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        if eos_id is not None:
            out.append(eos_id)
    return out


def prepare_tokenizer(rec: Recipe, run_dir: Path, data_root: str) -> tuple[Tokenizer, Path]:
    """The run's <run_dir>/tokenizer.json (built on the first run, read on a rerun): the recipe's byte-level BPE
    trained on its `train_on` text, or the named pretrained tokenizer, plus the chat special tokens.
    -> (tokenizer, its path)."""
    path = run_dir / "tokenizer.json"
    tk = rec.tokenizer
    if path.is_file():
        return load_tokenizer(path), path
    # every rank builds the (deterministic, identical) tokenizer itself and writes it atomically: no collective
    # here (a gloo barrier at this point was seen to hang intermittently)
    if tk.kind == "bpe":
        if tk.train_on == "shakespeare:train":
            texts = shakespeare_splits(data_root)[0]
        else:
            texts = take_chars(iter_source(tk.train_on))  # a bounded prefix of a (maybe endless) stream
        save_tokenizer(train_bpe(texts, tk.vocab_size, SPECIAL_TOKENS), path)
    else:  # "pretrained" (recipe_config admits no other kind)
        if tk.file:
            t = load_tokenizer(tk.file)
        else:
            try:
                t = Tokenizer.from_pretrained(tk.name)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"pretrained tokenizer {tk.name} is unreachable: {cli.one_line(e)}") from e
        t.add_special_tokens(list(SPECIAL_TOKENS))
        save_tokenizer(t, path)
    tok = load_tokenizer(path)
    special_ids(tok)
    return tok, path
