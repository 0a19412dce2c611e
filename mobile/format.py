"""The .mmoe file format (versions 1 and 2): constants and a pure-Python/numpy writer + reader. No torch here.

See mobile/FORMAT.md for the byte layout; the C loader (mobile/c/loader.c) is the authority on validation and
must agree with the constants below (tests/test_mobile_loader.py checks both sides).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.atomic import atomic_open, check_file_target  # plain Python, no torch

MAGIC = b"MMOEINT4"
# Version 1: every router f32. Version 2: a router may be f16 (the table entry's dtype says which); the writer
# stamps 2 only on files holding an f16 router, so f32 files stay version 1, byte for byte, for older engines.
VERSION = 2
VERSION_MIN = 1
ROUTER_DTYPES = ("f32", "f16")
HEADER_SIZE = 1024
ALIGN = 64
MAX_LAYERS = 256  # the header carries one layer-kind byte per layer
NAME_LEN = 64
ENTRY_SIZE = 104  # name[64] dtype u32 ndim u32 shape u32[4] offset u64 size u64
TOK_MAGIC = b"TOK1"

DT_F32, DT_F16, DT_Q4, DT_Q4_EXPERTS = 0, 1, 2, 3
DTYPE_NAMES = {DT_F32: "f32", DT_F16: "f16", DT_Q4: "q4g32", DT_Q4_EXPERTS: "q4g32-experts"}
LAYER_DENSE, LAYER_MOE = 0, 1
SCORE_SOFTMAX, SCORE_SIGMOID = 0, 1
TOK_IGNORE_MERGES = 1
TOK_ADD_PREFIX_SPACE = 2
SPECIAL_STOP = 1
STOP_TOKENS = ("<|endoftext|>", "<|end|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")

# Header: magic, then these little-endian fields in order (offsets in FORMAT.md); layer kinds at 256.
HEADER_FIELDS = [
    ("version", "I"), ("header_size", "I"), ("file_size", "Q"), ("n_tensors", "I"), ("flags", "I"),
    ("table_offset", "Q"), ("table_size", "Q"), ("tok_offset", "Q"), ("tok_size", "Q"),
    ("config_json_offset", "Q"), ("config_json_size", "Q"), ("data_offset", "Q"),
    ("vocab_size", "I"), ("d_model", "I"), ("n_layers", "I"), ("n_heads", "I"), ("n_kv_heads", "I"),
    ("head_dim", "I"), ("ffn_dim", "I"), ("max_seq_len", "I"), ("n_experts", "I"), ("top_k", "I"),
    ("expert_ffn_dim", "I"), ("n_shared_experts", "I"), ("shared_ffn_dim", "I"), ("router_score", "I"),
    ("norm_topk_prob", "I"), ("tie_embeddings", "I"), ("quant_group", "I"), ("eos_id", "i"),
    ("rope_theta", "f"), ("norm_eps", "f"),
]
HEADER_FMT = "<8s" + "".join(t for _, t in HEADER_FIELDS)
LAYER_KINDS_OFFSET = 256
assert struct.calcsize(HEADER_FMT) <= LAYER_KINDS_OFFSET


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def q4_bytes(rows: int, cols: int) -> int:
    """A Q4 matrix block: rows*cols/2 nibble bytes, then rows*cols/32 fp16 scales."""
    return rows * cols // 2 + rows * cols // 16


def expert_record_bytes(F: int, D: int) -> int:
    """One expert of a DT_Q4_EXPERTS tensor (shape (E, F, D)): gate_up (2F x D) block, padded to 64, then
    down (D x F) block, padded to 64. Records are back to back, so expert e starts at e * record."""
    return align_up(q4_bytes(2 * F, D)) + align_up(q4_bytes(D, F))


def tensor_bytes(dtype: int, shape: tuple[int, ...]) -> int:
    if dtype == DT_F32:
        return 4 * int(np.prod(shape))
    if dtype == DT_F16:
        return 2 * int(np.prod(shape))
    if dtype == DT_Q4:
        return q4_bytes(int(np.prod(shape[:-1])), shape[-1])
    if dtype == DT_Q4_EXPERTS:
        E, F, D = shape
        return E * expert_record_bytes(F, D)
    raise ValueError(f"unknown dtype {dtype}")


# ---- tokenizer blob ------------------------------------------------------------------------------------
@dataclass
class TokenizerBlob:
    """Byte-level BPE in raw bytes: vocab[i] = the bytes token i decodes to; merges in rank order as
    (left id, right id, merged id). `flags` & TOK_IGNORE_MERGES: a pre-token found whole in the vocab is
    emitted directly (tokenizers' ignore_merges)."""

    vocab: list[bytes]
    merges: list[tuple[int, int, int]] = field(default_factory=list)
    flags: int = 0
    eos_id: int = -1
    # added/special tokens: (id, flags); their text is matched whole before BPE (as `tokenizers` does);
    # flags & SPECIAL_STOP: generation stops on this token
    specials: list[tuple[int, int]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        offs = [0]
        for v in self.vocab:
            offs.append(offs[-1] + len(v))
        out = [TOK_MAGIC, struct.pack("<III", len(self.vocab), len(self.merges), self.flags),
               np.asarray(offs, dtype="<u4").tobytes(), b"".join(self.vocab),
               np.asarray(self.merges, dtype="<u4").reshape(-1, 3).tobytes(),
               struct.pack("<I", len(self.specials)), np.asarray(self.specials, dtype="<u4").reshape(-1, 2).tobytes()]
        return b"".join(out)


def byte_tokenizer() -> TokenizerBlob:
    """The plain 256-byte tokenizer random-init exports use: token i is byte i, no merges."""
    return TokenizerBlob(vocab=[bytes([i]) for i in range(256)])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-unicode map (byte-level BPE vocab strings use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_from_json(path: str | os.PathLike, vocab_size: int) -> TokenizerBlob:
    """Convert a `tokenizers` byte-level BPE tokenizer.json into the blob (vocab strings -> raw bytes)."""
    try:
        tj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # the caller's message must name the file
        raise ValueError(f"{path}: not a tokenizer.json ({e})") from None
    if not isinstance(tj, dict):
        raise ValueError(f"{path}: not a tokenizer.json (a JSON object expected)")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: only byte-level BPE tokenizers are supported, got model type {model.get('type')!r}")
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    vocab_map: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
    n = max(list(vocab_map.values()) + list(added.values())) + 1
    if n > vocab_size:
        raise ValueError(f"{path}: tokenizer has {n} ids but the model's vocab_size is {vocab_size}")
    vocab = [b""] * n
    for s, i in vocab_map.items():
        try:
            vocab[i] = bytes(u2b[c] for c in s)
        except KeyError as e:
            raise ValueError(f"{path}: vocab entry {s!r} is not byte-level (char {e})") from None
    for s, i in added.items():  # special tokens decode to their text; the C encoder never produces them
        vocab[i] = s.encode("utf-8")
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((vocab_map[a], vocab_map[b], vocab_map[a + b]))
    pre = tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pres):
        raise ValueError(f"{path}: pre-tokenizer must be ByteLevel (GPT-2 regex), got {pre.get('type')!r}")
    if tj.get("normalizer"):
        raise ValueError(f"{path}: tokenizers with a normalizer are not supported by the C tokenizer")
    flags = TOK_IGNORE_MERGES if model.get("ignore_merges") else 0
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pres):
        flags |= TOK_ADD_PREFIX_SPACE
    eos = next((added[n] for n in STOP_TOKENS if n in added), -1)
    specials = sorted((i, SPECIAL_STOP if s in STOP_TOKENS else 0) for s, i in added.items() if s)
    return TokenizerBlob(vocab=vocab, merges=merges, flags=flags, eos_id=eos, specials=specials)


# ---- writer --------------------------------------------------------------------------------------------
@dataclass
class TensorSpec:
    name: str
    dtype: int
    shape: tuple[int, ...]
    # called once with a writable binary file positioned at the tensor's offset; must write exactly
    # tensor_bytes(dtype, shape) bytes (streaming: big models never sit in memory at once)
    write: Callable


def file_version(tensors: Iterable[TensorSpec]) -> int:
    """The version a file holding these tensors is stamped with: 2 only when it has an f16 router."""
    return 2 if any(t.dtype == DT_F16 and t.name.endswith(".moe.router") for t in tensors) else 1


def router_tensor(name: str, w_ED: np.ndarray, dtype: str) -> TensorSpec:
    """A router matrix as f32, or as f16 rounded to nearest even (numpy's cast); a weight beyond the fp16 range
    is an export error naming the tensor, never an inf in the file."""
    if dtype not in ROUTER_DTYPES:
        raise ValueError(f"router dtype {dtype!r}: choose one of {', '.join(ROUTER_DTYPES)}")
    if dtype == "f32":
        a = np.ascontiguousarray(w_ED, dtype="<f4")
        return TensorSpec(name, DT_F32, tuple(a.shape), lambda f, a=a: f.write(a.tobytes()))
    a = np.asarray(w_ED, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = np.ascontiguousarray(a.astype("<f2"))
    bad = int(np.count_nonzero(~np.isfinite(h) & np.isfinite(a)))
    if bad:
        raise ValueError(f"{name}: {bad} router weights exceed the fp16 range (|w| > 65504); export with "
                         "--router-dtype f32")
    return TensorSpec(name, DT_F16, tuple(h.shape), lambda f, h=h: f.write(h.tobytes()))


def header_values(cfg: dict, layer_kinds: list[int], eos_id: int) -> dict:
    return dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"], head_dim=cfg["head_dim"], ffn_dim=cfg["ffn_dim"],
        max_seq_len=cfg["max_seq_len"], n_experts=cfg["n_experts"], top_k=cfg["top_k"],
        expert_ffn_dim=cfg["expert_ffn_dim"], n_shared_experts=cfg["n_shared_experts"],
        shared_ffn_dim=cfg["shared_ffn_dim"],
        router_score=SCORE_SOFTMAX if cfg["router_score"] == "softmax" else SCORE_SIGMOID,
        norm_topk_prob=int(bool(cfg["norm_topk_prob"])), tie_embeddings=int(bool(cfg["tie_embeddings"])),
        quant_group=cfg["quant_group"], eos_id=eos_id, rope_theta=float(cfg["rope_theta"]),
        norm_eps=float(cfg["norm_eps"]),
    )


def check_mmoe_target(out: str | os.PathLike, force: bool = False) -> None:
    """Raise TargetExistsError unless write_mmoe may write `out`: a new path, an empty file or a .mmoe (its
    magic), anything with force=True; never a directory."""
    check_file_target(out, magic=MAGIC, what="a .mmoe file", force=force)


def write_mmoe(out: str | os.PathLike, cfg: dict, tensors: Iterable[TensorSpec], tok: TokenizerBlob,
               force: bool = False) -> Path:
    """Atomically write a .mmoe file: temp file in the same folder, fsync, rename. An existing `out` is replaced
    only when it is a .mmoe file (or empty) unless force=True; a directory never (TargetExistsError)."""
    out = Path(out)
    check_mmoe_target(out, force)
    tensors = list(tensors)
    if cfg["n_layers"] > MAX_LAYERS:
        raise ValueError(f"n_layers={cfg['n_layers']} exceeds the format's limit of {MAX_LAYERS}")
    if cfg["quant_group"] != 32:
        raise ValueError(f"the format stores INT4 in groups of 32, config has quant_group={cfg['quant_group']}")
    layer_kinds = [LAYER_MOE if (cfg["n_experts"] > 0 and i not in cfg["dense_layers"]) else LAYER_DENSE
                   for i in range(cfg["n_layers"])]
    cfg_json = json.dumps(cfg, sort_keys=True).encode()
    tok_b = tok.to_bytes()
    table_offset = HEADER_SIZE
    table_size = ENTRY_SIZE * len(tensors)
    pos = align_up(table_offset + table_size)
    tok_offset, pos = pos, align_up(pos + len(tok_b))
    cj_offset, pos = pos, align_up(pos + len(cfg_json))
    data_offset = pos
    entries = []
    for t in tensors:
        if len(t.name.encode()) >= NAME_LEN:
            raise ValueError(f"tensor name too long: {t.name}")
        size = tensor_bytes(t.dtype, t.shape)
        entries.append((t, pos, size))
        pos = align_up(pos + size)
    file_size = pos
    vals = dict(version=file_version(tensors), header_size=HEADER_SIZE, file_size=file_size, n_tensors=len(tensors), flags=0,
                table_offset=table_offset, table_size=table_size, tok_offset=tok_offset, tok_size=len(tok_b),
                config_json_offset=cj_offset, config_json_size=len(cfg_json), data_offset=data_offset,
                **header_values(cfg, layer_kinds, tok.eos_id))
    header = bytearray(HEADER_SIZE)
    packed = struct.pack(HEADER_FMT, MAGIC, *[vals[k] for k, _ in HEADER_FIELDS])
    header[:len(packed)] = packed
    header[LAYER_KINDS_OFFSET:LAYER_KINDS_OFFSET + len(layer_kinds)] = bytes(layer_kinds)
    table = bytearray()
    for t, off, size in entries:
        shape = list(t.shape) + [0] * (4 - len(t.shape))
        table += struct.pack("<64sII4IQQ", t.name.encode(), t.dtype, len(t.shape), *shape, off, size)
    with atomic_open(out, "wb", magic=MAGIC, what="a .mmoe file", force=force) as f:
        f.write(header)
        f.write(table)
        f.seek(tok_offset)
        f.write(tok_b)
        f.seek(cj_offset)
        f.write(cfg_json)
        for t, off, size in entries:
            f.seek(off)
            t.write(f)
            if f.tell() != off + size:
                raise RuntimeError(f"tensor {t.name}: wrote {f.tell() - off} bytes, expected {size}")
        f.truncate(file_size)
    return out


# ---- reader (tests, tooling) ---------------------------------------------------------------------------
@dataclass
class TensorEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    size: int
    index: int  # row in the table (tests edit entries in place)


def read_header(buf: bytes) -> dict:
    if len(buf) < HEADER_SIZE or buf[:8] != MAGIC:
        raise ValueError("not a .mmoe file (bad magic or too short)")
    vals = struct.unpack_from(HEADER_FMT, buf, 0)
    h = {k: v for (k, _), v in zip(HEADER_FIELDS, vals[1:])}
    h["layer_kinds"] = list(buf[LAYER_KINDS_OFFSET:LAYER_KINDS_OFFSET + h["n_layers"]])
    return h


def header_field_offset(name: str) -> tuple[int, str]:
    """(byte offset, struct code) of a header field: the loader tests patch fields in place."""
    off = 8
    for k, t in HEADER_FIELDS:
        if k == name:
            return off, t
        off += struct.calcsize("<" + t)
    raise KeyError(name)


def read_table(buf: bytes) -> list[TensorEntry]:
    h = read_header(buf)
    out = []
    for i in range(h["n_tensors"]):
        name, dt, nd, s0, s1, s2, s3, off, size = struct.unpack_from("<64sII4IQQ", buf, h["table_offset"] + i * ENTRY_SIZE)
        out.append(TensorEntry(name.rstrip(b"\0").decode(), dt, (s0, s1, s2, s3)[:nd], off, size, i))
    return out


def table_entry_offset(buf: bytes, index: int) -> int:
    return read_header(buf)["table_offset"] + index * ENTRY_SIZE
