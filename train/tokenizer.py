"""Tokenizers for training.

The embedded default trains a byte-level BPE on its training split: the standard ByteLevel pre-tokenizer
(GPT-2 regex, no prefix space) + ByteLevel decoder, nothing else (no normalizer, no post-processor), so a C
encoder can reproduce it from tokenizer.json alone. Special tokens (train/chat.py) get ids 0..n-1 in order.
Real-data sizes load a named pretrained tokenizer file (`tokenizer.json`) instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


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
