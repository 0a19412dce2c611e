"""Pre-tokenized token stores: the on-disk format, its resumable builder, and the stage-mixture loader.

A store is a folder:
    manifest.json        {"format", "dtype", "vocab_size", "eos_id", "shard_tokens", "tokenizer", "source",
                          "shards": [{"file", "tokens", "docs", "sha256", "next_doc", "next_skip"}], "complete",
                          "tokens", "docs", "rows", "skipped"}
    shard_00000.bin ...  raw little-endian token ids (uint16 when every id fits, else uint32), `shard_tokens`
                         each (the last one shorter). One stream: every document's ids followed by EOS, documents
                         running across shard boundaries. No header, so `np.memmap(f, dtype)` reads a shard.

Building (`python -m train.data prepare`, or build_store) is resumable and atomic per shard: a shard is
written to a temporary name beside it, fsynced and renamed, then the manifest (written the same way) lists it
with the input position after it (`next_doc`: index of the first input document not wholly written,
`next_skip`: how many of its tokens (EOS included) are). A killed build leaves the listed shards intact; the
rerun skips `next_doc` documents, drops `next_skip` tokens of the next one and carries on, so the result is
byte-identical to an uninterrupted build (tokenization is a pure function of the document). The manifest
holds no time stamps for the same reason.

Loading (StoreMixture): a stage's mixture of stores by weight. Each store is cut into windows of T+1 tokens at
stride T (every token is a target once per epoch). Each step gives every source a fixed number of the global
batch's rows (the weights apportioned over the batch, largest remainder), so source j's k-th draw overall is
draw k = step * rows_j + i, and it reads window perm_{j,epoch}(k mod windows_j), epoch = k // windows_j,
perm a keyed Feistel bijection: every window once per epoch, in a fresh order each epoch. The batch's rows are
then shuffled by a per-step key. Everything is a pure function of (seed, salt, step): a resumed run reads the
same tokens, and rank r of W reads only rows [r*B/W, (r+1)*B/W) of the step. Reads go through os.pread into
one small buffer per row, so neither the corpus nor its mapped pages accumulate in the process.

numpy only (no torch) except StoreMixture.get, which returns torch tensors for train.loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.cli import BadInput

FORMAT = "mobilemoe-tokens-1"
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB of uint16: a kill loses at most ~a minute of tokenizing on 16 cores
FAULT_ENV = "MOBILEMOE_STORE_FAULT"
# "<point>" or "<point>:<shard index>" (default 0): SIGKILL the build there, for the resume tests.
FAULT_POINTS = ("shard_tmp",        # shard bytes in the temporary file (fsynced), not renamed
                "shard_renamed",    # shard under its final name, manifest not yet updated
                "manifest")         # manifest lists the shard
_MASK64 = (1 << 64) - 1


class StoreError(BadInput):
    """A token-store problem the CLIs print as one line (exit 2)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    if vocab_size < 1:
        raise StoreError(f"vocab size must be >= 1, got {vocab_size}")
    if vocab_size > 1 << 32:
        raise StoreError(f"vocab size {vocab_size} does not fit uint32 ids")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------------------
# fingerprints
def tokenizer_fingerprint(tok) -> str:
    """The tokenizer minus its added-token list: the same for a pretrained tokenizer.json and a run's copy of
    it with the chat special tokens added (train/tokenizer.py prepare_tokenizer), which encode plain text to the
    same ids. The EOS id, which added tokens can change, is compared on its own (manifest "eos_id")."""
    d = json.loads(tok.to_str())
    d.pop("added_tokens", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def source_fingerprint(source: str, text_field: str, split: str) -> dict:
    """What the store was built from. A hub source is named (and its split / field); local files by relative
    name, size and a hash of their first and last MiB (cheap for terabytes, and catches an edited or
    replaced file)."""
    fp: dict = dict(spec=source, text_field=text_field, split=split)
    if source.startswith("hf:"):
        return fp
    p = Path(source)
    if not p.exists():
        raise StoreError(f"data file not found: {source}")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    fp["files"] = len(files)
    fp["content"] = h.hexdigest()[:16]
    return fp


# ------------------------------------------------------------------------------------------------------
# atomic writes
def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fault(point: str, shard: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and shard == int(at or 0):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no finally blocks, no flushes


def _dump(man: dict) -> bytes:
    return (json.dumps(man, indent=1) + "\n").encode()


# ------------------------------------------------------------------------------------------------------
# building
def _open_out(out: Path, want: dict) -> dict:
    """The manifest to continue from: a fresh one for a new / empty folder, the folder's own when it was built
    from the same source, tokenizer and shard size. Anything else in the folder is refused, never deleted."""
    mf = out / MANIFEST
    if mf.is_file():
        try:
            man = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{mf}: unreadable manifest ({e})") from None
        if man.get("format") != FORMAT:
            raise StoreError(f"{mf}: not a {FORMAT} store manifest")
        for k in ("source", "tokenizer", "shard_tokens", "dtype", "eos_id", "max_tokens"):
            if man.get(k) != want[k]:
                raise StoreError(f"{out}: a store built with a different {k} ({man.get(k)!r}, now {want[k]!r}); "
                                 f"use a new --out")
        for s in man["shards"]:
            f = out / s["file"]
            n = f.stat().st_size if f.is_file() else -1
            if n != s["tokens"] * np.dtype(man["dtype"]).itemsize:
                raise StoreError(f"{f}: listed in the manifest with {s['tokens']} tokens but "
                                 f"{'missing' if n < 0 else f'{n} bytes long'} (a damaged store; use a new --out)")
        return man
    _refuse_foreign(out)
    return dict(want, shards=[], complete=False)


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not (out / MANIFEST).is_file():
        if not out.is_dir():
            raise StoreError(f"--out {out}: a file, not a folder")
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise StoreError(f"--out {out}: not empty and not a token store (no {MANIFEST}); refusing to write "
                             f"into it")



def try_lock(path: Path):
    """An exclusive flock on `path` (created if absent), held while the returned file stays open (and released
    by the kernel if the process dies); None at once when another process holds it."""
    f = open(path, "w")  # noqa: SIM115  (the caller keeps it open as the lock)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f

def build_store(source: str, tok, out: str | os.PathLike, *, text_field: str = "text", split: str = "train",
                shard_tokens: int = DEFAULT_SHARD_TOKENS, max_tokens: int | None = None, eos_token: str | None = None,
                batch_docs: int = 1024, progress: bool = True, docs: Iterable[str] | None = None,
                source_fp: dict | None = None) -> dict:
    """Tokenize `source` into the store at `out` (resuming a partial one). Returns the final manifest.

    `tok` is a tokenizers.Tokenizer; its `encode_batch_fast` spreads each batch of documents over all cores.
    `docs` overrides the documents read from `source` (tests, and a run's Shakespeare split); the fingerprint
    then names `source`, or is `source_fp` when given (what the documents were derived from, so a store of
    another corpus or split is refused on resume)."""
    from tqdm import tqdm  # noqa: PLC0415

    from train.data import DataError, iter_source  # noqa: PLC0415  (train.data's CLI imports this module)

    if shard_tokens < 1:
        raise StoreError(f"shard size must be >= 1 token, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise StoreError(f"max tokens must be >= 1, got {max_tokens}")
    if eos_token is None:
        from model.chat_template import EOS  # noqa: PLC0415

        eos_token = EOS
    eos = tok.token_to_id(eos_token)
    if eos is None:
        raise StoreError(f"the tokenizer has no end-of-document token {eos_token!r} (pass --eos-token)")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    out = Path(out)
    want = dict(format=FORMAT, dtype=dtype.name, vocab_size=vocab, eos_id=eos, eos_token=eos_token,
                shard_tokens=shard_tokens, max_tokens=max_tokens, tokenizer=tokenizer_fingerprint(tok),
                source=source_fp if source_fp is not None else
                source_fingerprint(source, text_field, split) if docs is None else dict(spec=source))
    _refuse_foreign(out)  # before the lock file, so a foreign folder gets nothing written into it
    out.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out / ".prepare.lock")  # held for the whole build
    if lock is None:
        raise StoreError(f"{out}: another prepare is writing this store")
    try:
        man = _open_out(out, want)
        if man["complete"]:
            return man
        for p in out.glob(".shard_*.tmp-*"):  # a killed build's unfinished shard (we hold the lock)
            p.unlink()
        stats: dict = {}
        if docs is None:
            docs = iter_source(source, text_field, split, stats)
        try:
            return _build(man, out, tok, iter(docs), stats, dtype, eos, batch_docs, progress, tqdm)
        except DataError as e:
            raise StoreError(str(e)) from e
    finally:
        lock.close()


def _batches(docs: Iterator[str], n: int, first: int) -> Iterator[list[str]]:
    """Batches of n documents, the first one `first` long: a resumed build keeps the uninterrupted build's
    batch boundaries, so it reads as far ahead as that build did (the manifest's row counts agree under a
    --max-tokens cap too)."""
    size = first or n
    while True:
        b = list(itertools.islice(docs, size))
        size = n
        if not b:
            return
        yield b


def _build(man, out, tok, docs, stats, dtype, eos, batch_docs, progress, tqdm) -> dict:
    S, cap = man["shard_tokens"], man["max_tokens"]
    written = sum(s["tokens"] for s in man["shards"])
    last = man["shards"][-1] if man["shards"] else dict(next_doc=0, next_skip=0)
    # skip the documents already wholly in the store; the next one's first `next_skip` tokens are too
    start_doc, skip = last["next_doc"], last["next_skip"]
    if sum(1 for _ in itertools.islice(docs, start_doc)) < start_doc:
        raise StoreError(f"{out}: the source now has fewer than the {start_doc} documents the store was built "
                         f"from (use a new --out)")
    parts: list[np.ndarray] = []   # tokens not yet in a shard
    lens: list[int] = []           # per document in `parts`, from its first unwritten token
    buffered = 0
    buf_doc, buf_skip = start_doc, skip   # input position of parts' first token
    bar = tqdm(total=cap, initial=written, unit="tok", unit_scale=True, disable=not progress, smoothing=0.1,
               desc=f"prepare {out.name}", dynamic_ncols=True)

    def flush(n: int) -> None:
        nonlocal parts, lens, buffered, buf_doc, buf_skip
        flat = np.concatenate(parts) if len(parts) != 1 else parts[0]
        shard, rest = flat[:n], flat[n:]
        # the input position after the shard: walk the per-document lengths across n tokens
        used, i = 0, 0
        while i < len(lens) and used + lens[i] <= n:
            used += lens[i]
            i += 1
        nxt_doc = buf_doc + i
        nxt_skip = (buf_skip if i == 0 else 0) + (n - used)
        lens = ([lens[i] - (n - used)] if n > used else []) + lens[i + 1 if n > used else i:]
        parts, buffered, buf_doc, buf_skip = ([rest] if rest.size else []), int(rest.size), nxt_doc, nxt_skip
        k = len(man["shards"])
        name = f"shard_{k:05d}.bin"
        tmp = out / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(memoryview(np.ascontiguousarray(shard)).cast("B"))
            fh.flush()
            os.fsync(fh.fileno())
        _fault("shard_tmp", k)
        os.replace(tmp, out / name)
        _fsync_dir(out)
        _fault("shard_renamed", k)
        man["shards"].append(dict(file=name, tokens=int(n), docs=int(np.count_nonzero(shard == eos)),
                                  sha256=hashlib.sha256(memoryview(np.ascontiguousarray(shard)).cast("B")).hexdigest(),
                                  next_doc=int(nxt_doc), next_skip=int(nxt_skip)))
        _write_atomic(out / MANIFEST, _dump(man))
        _fault("manifest", k)

    first = True
    done = False
    try:
        for batch in _batches(docs, batch_docs, batch_docs - start_doc % batch_docs):
            ids_all: list[int] = []
            for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
                ids = enc.ids
                n0 = len(ids_all)
                if ids:  # an empty document adds nothing (not even EOS), but still counts as a document
                    ids_all.extend(ids)
                    ids_all.append(eos)
                lens.append(len(ids_all) - n0)
            arr = np.array(ids_all, dtype=dtype)
            if first and skip:
                # the resumed-into document: its first `skip` tokens are in the last shard already
                arr, lens[0] = arr[skip:], lens[0] - skip
            first = False
            if cap is not None and written + buffered + arr.size >= cap:
                arr, done = arr[:cap - written - buffered], True
            parts.append(arr)
            buffered += arr.size
            bar.update(arr.size)
            while buffered >= S:
                flush(S)
                written += S
            if done:
                break
        if buffered:
            flush(buffered)
            written += man["shards"][-1]["tokens"]
    finally:
        bar.close()
    if not man["shards"]:
        raise StoreError(f"{man['source']['spec']}: no usable text (0 tokens)")
    man.update(complete=True, tokens=written, docs=sum(s["docs"] for s in man["shards"]),
               rows=stats.get("rows"), skipped=stats.get("skipped"))
    _write_atomic(out / MANIFEST, _dump(man))
    return man


def write_store(out: str | os.PathLike, shards: Iterable[np.ndarray], *, vocab_size: int, eos_id: int,
                source: str = "arrays") -> dict:
    """A complete store from ready token arrays, one per shard (synthetic stores for tests and bench/data.py).
    Each shard is written atomically; the manifest last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    man = dict(format=FORMAT, dtype=dtype.name, vocab_size=vocab_size, eos_id=eos_id, eos_token=None,
               shard_tokens=None, max_tokens=None, tokenizer=None, source=dict(spec=source), shards=[])
    for k, arr in enumerate(shards):
        arr = np.ascontiguousarray(arr, dtype=dtype)
        name = f"shard_{k:05d}.bin"
        _write_atomic(out / name, memoryview(arr).cast("B"))
        man["shards"].append(dict(file=name, tokens=int(arr.size), docs=int(np.count_nonzero(arr == eos_id)),
                                  sha256=hashlib.sha256(memoryview(arr).cast("B")).hexdigest(),
                                  next_doc=None, next_skip=None))
    man["shard_tokens"] = man["shards"][0]["tokens"] if man["shards"] else 0
    man.update(complete=True, tokens=sum(s["tokens"] for s in man["shards"]),
               docs=sum(s["docs"] for s in man["shards"]), rows=None, skipped=None)
    _write_atomic(out / MANIFEST, _dump(man))
    return man


# ------------------------------------------------------------------------------------------------------
# reading
class TokenStore:
    """A complete store, read on demand: the manifest in memory, shards read with os.pread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise StoreError(f"{self.path}: not a token store (no {MANIFEST}; build it with "
                             f"`python -m train.data prepare`)")
        try:
            man = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{mf}: unreadable manifest ({e})") from None
        if man.get("format") != FORMAT:
            raise StoreError(f"{mf}: not a {FORMAT} store manifest")
        if not man.get("complete"):
            raise StoreError(f"{self.path}: an unfinished store ({len(man['shards'])} shards); rerun the same "
                             f"`python -m train.data prepare` to finish it")
        self.manifest = man
        self.dtype = np.dtype(man["dtype"])
        self.eos_id, self.vocab_size = int(man["eos_id"]), int(man["vocab_size"])
        sizes = np.array([s["tokens"] for s in man["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k holds tokens [starts[k], starts[k+1])
        self.n_tokens = int(self.starts[-1])
        self._fds: dict[int, int] = {}

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            f = self.path / self.manifest["shards"][k]["file"]
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError as e:
                raise StoreError(f"{f}: {e.strerror}") from None
            self._fds[k] = fd
        return fd

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start+length) of the stream (across shards), in the store's dtype."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the store's {self.n_tokens}")
        buf = np.empty(length, self.dtype) if out is None else out
        view = memoryview(buf).cast("B")
        isz = self.dtype.itemsize
        pos, k = start, int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < start + length:
            take = min(int(self.starts[k + 1]) - pos, start + length - pos)
            lo = (pos - start) * isz
            got = os.preadv(self._fd(k), [view[lo:lo + take * isz]], (pos - int(self.starts[k])) * isz)
            if got != take * isz:
                raise StoreError(f"{self.path / self.manifest['shards'][k]['file']}: short read (truncated shard?)")
            pos += take
            k += 1
        return buf

    def memmap(self, k: int) -> np.memmap:
        """Shard k as a read-only memory map (zero-copy views, e.g. for evaluation sweeps)."""
        return np.memmap(self.path / self.manifest["shards"][k]["file"], dtype=self.dtype, mode="r")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


# ------------------------------------------------------------------------------------------------------
# counter-based permutations
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _key(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = int(_mix64(np.array([(h ^ (int(p) & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return h


def permute(idx: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) applied to idx: a balanced Feistel network over the next even power of two,
    cycle-walking the values that land outside [0, n)."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(idx)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    m = np.uint64((1 << half) - 1)
    sh = np.uint64(half)
    ks = [np.uint64(_key(key, r)) for r in range(rounds)]

    def feistel(x):
        L, R = x >> sh, x & m
        for k in ks:
            L, R = R, L ^ (_mix64(R ^ k) & m)
        return (L << sh) | R

    with np.errstate(over="ignore"):
        out = feistel(idx)
        bad = out >= np.uint64(n)
        while bad.any():  # at most 4x the domain: a few walks on average
            out[bad] = feistel(out[bad])
            bad = out >= np.uint64(n)
    return out.astype(np.int64)


def _raw(seed_parts: tuple[int, ...], n: int) -> np.ndarray:
    """n uint64 from PCG64 seeded by the parts: the bit generator's raw output is stable across numpy versions
    (Generator methods are not promised to be)."""
    return np.random.PCG64(np.random.SeedSequence([int(p) & _MASK64 for p in seed_parts])).random_raw(n)


def apportion(weights: list[float], total: int) -> list[int]:
    """Integer rows per source summing to `total`, proportional to `weights` (largest remainder; ties to the
    earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not w.size or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise StoreError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
    q = w / w.sum() * total
    n = np.floor(q).astype(np.int64)
    order = sorted(range(len(w)), key=lambda j: (-(q[j] - n[j]), j))
    for j in order[:total - int(n.sum())]:
        n[j] += 1
    return [int(x) for x in n]


# ------------------------------------------------------------------------------------------------------
# the stage mixture
@dataclass
class SourceUse:
    """One source of a stage: rows per step, its windows, and what the stage would read of it."""
    name: str
    weight: float
    rows_per_step: int
    unique_tokens: int       # targets in one epoch: windows x T
    planned_tokens: int      # targets read over the stage
    epochs: float


class StoreMixture:
    """The global batch of step s from a weighted mixture of stores, as a pure function of (seed, salt, s).

    rows(step, rank, world) -> ids (B/world, T+1) int64: inputs ids[:, :-1], targets ids[:, 1:]. Each row is a
    packed window (documents separated by EOS); packing(ids) gives document ids / positions for masking.
    rank_batch(step, rank, world) is what train.loop reads: this rank's rows only, and with doc_mask on the
    document id of every input token (packing's, so a token's document changes right after each EOS)."""

    def __init__(self, stores: list[TokenStore], weights: list[float], seq_len: int, global_batch: int,
                 seed: int = 0, salt: int = 0, names: list[str] | None = None, rank: int = 0, world: int = 1,
                 doc_mask: bool = False):
        if not stores or len(stores) != len(weights):
            raise StoreError("a mixture needs one weight per store and at least one store")
        eos = {s.eos_id for s in stores}
        if len(eos) != 1:
            raise StoreError(f"the mixture's stores use different EOS ids {sorted(eos)} (different tokenizers?)")
        self.stores, self.T, self.B, self.seed, self.salt = stores, seq_len, global_batch, seed, salt
        self.rank, self.world = rank, world
        self.names = names or [str(s.path) for s in stores]
        self.eos_id = eos.pop()
        self.doc_mask = bool(doc_mask)
        self.weights = [float(w) for w in weights]
        self.n_rows = apportion(self.weights, global_batch)
        for nm, w, r in zip(self.names, self.weights, self.n_rows):
            if w > 0 and r == 0:
                raise StoreError(f"mixture source {nm}: weight {w:g} gets no row of a global batch of "
                                 f"{global_batch} (raise the weight or the batch)")
        self.windows = [(s.n_tokens - 1) // seq_len for s in stores]
        for nm, s, nw, r in zip(self.names, stores, self.windows, self.n_rows):
            if r and nw < 1:
                raise StoreError(f"store {nm}: {s.n_tokens} tokens, fewer than one window of {seq_len + 1}")
        self.src_of_row = np.repeat(np.arange(len(stores)), self.n_rows)  # before the per-step shuffle

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index (B,), window index (B,)) of the step's rows, in batch order."""
        win = np.empty(self.B, dtype=np.int64)
        at = 0
        for j, r in enumerate(self.n_rows):
            if not r:
                continue
            k = np.arange(step * r, step * r + r, dtype=np.int64)   # source j's draws so far, closed form
            nw = self.windows[j]
            ep, i = k // nw, k % nw
            for e in np.unique(ep):
                sel = ep == e
                win[at:at + r][sel] = permute(i[sel], nw, _key(self.seed, self.salt, j, int(e)))
            at += r
        order = np.argsort(_raw((self.seed, self.salt, step, 0x5EED), self.B), kind="stable")
        return self.src_of_row[order], win[order]

    def rows(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        if world < 1 or not 0 <= rank < world or self.B % world:
            raise StoreError(f"rank {rank} of world {world}: the global batch {self.B} must split evenly")
        per = self.B // world
        src, win = self.plan(step)
        out = np.empty((per, self.T + 1), dtype=np.int64)
        buf = np.empty(self.T + 1, dtype=self.stores[0].dtype)
        for r, (j, w) in enumerate(zip(src[rank * per:(rank + 1) * per], win[rank * per:(rank + 1) * per])):
            st = self.stores[j]
            if st.dtype != buf.dtype:
                buf = np.empty(self.T + 1, dtype=st.dtype)
            out[r] = st.read(int(w) * self.T, self.T + 1, out=buf)
        return out

    def get(self, step: int):
        """(ids (B, T+1), mask (B, T)) as torch int64 tensors: the train.batches.Batcher interface, whose caller
        (train.loop) takes rows [rank*B/W, (rank+1)*B/W) and counts mask.sum() as the global target count. Only
        this object's own rank's rows are read; the others are left 0 (every target counts, so the mask is
        all ones and the count is right)."""
        import torch  # noqa: PLC0415

        ids = torch.zeros(self.B, self.T + 1, dtype=torch.long)
        per = self.B // self.world
        ids[self.rank * per:(self.rank + 1) * per] = torch.from_numpy(self.rows(step, self.rank, self.world))
        return ids, torch.ones(self.B, self.T, dtype=torch.long)

    def set_doc_mask(self, on: bool, eos_id: int | None = None) -> None:
        """Document masking for rank_batch (train.batches.Batcher's interface); eos_id, when given, must be the
        stores' own."""
        if on and eos_id is not None and int(eos_id) != self.eos_id:
            raise StoreError(f"document masking with EOS id {eos_id}, but the stores end documents with "
                             f"{self.eos_id}")
        self.doc_mask = bool(on)

    def rank_batch(self, step: int, rank: int = 0, world: int = 1):
        """train.batches.RankBatch of this rank's rows: only they are read, every target counts (B*T in all)."""
        import torch  # noqa: PLC0415

        from train.batches import RankBatch  # noqa: PLC0415  (torch; this module is numpy only)

        rows = self.rows(step, rank, world)
        doc = torch.from_numpy(packing(rows[:, :-1], self.eos_id)[0]) if self.doc_mask else None
        return RankBatch(torch.from_numpy(rows), torch.ones(rows.shape[0], self.T, dtype=torch.long),
                         self.B * self.T, doc)

    def usage(self, steps: int) -> list[SourceUse]:
        return [SourceUse(nm, w, r, nw * self.T, steps * r * self.T, (steps * r / nw) if nw else 0.0)
                for nm, w, r, nw in zip(self.names, self.weights, self.n_rows, self.windows)]


DEFAULT_MAX_EPOCHS = 4.0  # repeating data up to ~4 epochs costs little (Muennighoff et al. 2023); more is warned


def is_store(source: str) -> bool:
    """A mixture / eval source that names a token-store folder."""
    return not source.startswith(("hf:", "shakespeare:")) and (Path(source) / MANIFEST).is_file()


def open_stores(sources: list[str], tok=None) -> list[TokenStore]:
    """The stores, checked against the run's tokenizer (same base tokenizer and EOS id) when given."""
    stores = [TokenStore(s) for s in sources]
    if tok is not None:
        from model.chat_template import EOS  # noqa: PLC0415

        fp, eos = tokenizer_fingerprint(tok), tok.token_to_id(EOS)
        for src, st in zip(sources, stores):
            m = st.manifest
            if m.get("tokenizer") not in (None, fp) or st.eos_id != eos:
                raise StoreError(f"store {src} was built with another tokenizer (fingerprint {m.get('tokenizer')}, "
                                 f"EOS id {st.eos_id}; this run's: {fp}, {eos}); rebuild it with "
                                 f"`python -m train.data prepare --tokenizer <run>/tokenizer.json`")
            if st.vocab_size > tok.get_vocab_size(with_added_tokens=True):
                raise StoreError(f"store {src}: vocab {st.vocab_size} > the run tokenizer's "
                                 f"{tok.get_vocab_size(with_added_tokens=True)}")
    return stores


def stage_uses_stores(sources: list[str], chat: list[bool], stage: str) -> bool:
    """True when a stage reads token stores (every source is one), False when it reads none; a mix is refused
    (one stage reads through one loader) and so is a store given as a chat source."""
    flags = [is_store(s) for s in sources]
    for s, f, c in zip(sources, flags, chat):
        if f and c:
            raise StoreError(f"stage {stage}: {s} is a token store (text tokens), not a chat source")
    if any(flags) and not all(flags):
        raise StoreError(f"stage {stage}: mixes token stores ({', '.join(s for s, f in zip(sources, flags) if f)}) "
                         f"with other sources ({', '.join(s for s, f in zip(sources, flags) if not f)}); prepare "
                         f"them all with `python -m train.data prepare`, or none")
    return bool(flags) and all(flags)


def packing(ids_BT: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids (B, T), positions (B, T)) for packed rows: a token's document is the count of EOS before it
    in the row (an EOS belongs to the document it ends); positions restart at 0 after every EOS. Attention
    within a document: q may see k iff doc_ids[q] == doc_ids[k] and k <= q."""
    is_eos = np.asarray(ids_BT) == eos_id
    doc = np.cumsum(is_eos, axis=1) - is_eos
    T = is_eos.shape[1]
    t = np.broadcast_to(np.arange(T), is_eos.shape)
    # start of each token's document = 1 + the last EOS strictly before it (0 when none)
    starts = np.where(is_eos, t + 1, 0)
    starts = np.maximum.accumulate(np.concatenate([np.zeros((is_eos.shape[0], 1), np.int64), starts[:, :-1]],
                                                  axis=1), axis=1)
    return doc.astype(np.int64), (t - starts).astype(np.int64)


def data_report(stores: list[TokenStore], weights: list[float], seq_len: int, global_batch: int, steps: int,
                names: list[str] | None = None, max_epochs: float = DEFAULT_MAX_EPOCHS) -> tuple[list[SourceUse], list[str]]:
    """What a stage would read of each store (unique vs planned tokens, epochs) and a warning per source that
    would repeat its data more than `max_epochs` times. Reads only the manifests."""
    mix = StoreMixture(stores, weights, seq_len, global_batch, names=names)
    use = mix.usage(steps)
    warn = [f"{u.name}: {u.epochs:.1f} epochs ({u.planned_tokens:,} planned of {u.unique_tokens:,} unique tokens) "
            f"> {max_epochs:g}" for u in use if u.epochs > max_epochs]
    return use, warn
