"""Which loader a stage's data goes through, the run's own token stores, and the data plan of `--dry-run`.

Run stores (`[data] build_stores = true`; the embedded default train/configs/tiny.toml): a stage whose every
source is LM text that is not a hub dataset (shakespeare:train / shakespeare:quality, a local .txt / .jsonl /
.parquet file or folder, or an already prepared store) has each non-store source tokenized into
<run>/store/<name> by train/store.py's build_store when the stage's batches are first needed (after the run's
tokenizer exists: the tiny BPE is trained in the run, so `make data` cannot build them), and trains from
StoreMixture like a prepared store. The build is atomic per shard and resumable (a killed run continues it),
a finished store is reused, and a store built from another corpus, split or tokenizer is refused. The
Shakespeare stores hold the training split only (train.data.shakespeare_splits: HELDOUT_PLAYS, three whole
plays, are never in them; their manifest records the held-out list and a hash of the corpus). Stages with a
chat source (tiny's SFT / QAT: prompt/response pairs mixed with a little text replay) keep the in-memory
Batcher: a store holds LM text only. Hub sources are never tokenized inside the run (prepare them with
`python -m train.data prepare` and name the store folder as the source).

Prepared stores (`store = NAME` beside a hub / file `source`; the shipped S / M / L recipes): the source is
what the store is built from, <[data] store_root>/<NAME> is what the stage reads. prepare_command() is the
exact `python -m train.data prepare` line that builds it (`python -m train.prepare` / `make data SIZE=M` runs
them all); a dry run shows a store that is not built yet with that line, and a run refuses to start a store
stage while any prepared store of the recipe is missing or unfinished (check_prepared_stores).

The plan (plan_lines): per source its weight, rows per step, unique tokens (a store's manifest, or the
source's declared `tokens`; an in-memory file / hub text source reads at most its cap, `max_tokens` or 50M,
so it shows "<= cap" and ">= planned / cap" epochs; otherwise "unknown (...)", never a guess), the stage's
planned tokens of it and the epochs that makes, then a warning per source repeated more than
`[data] max_epochs` times (for a capped source: when even the lower bound is above it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.store import (
    MANIFEST,
    StoreError,
    StoreMixture,
    TokenStore,
    apportion,
    build_store,
    is_store,
    open_stores,
    source_fingerprint,
    stage_uses_stores,
)

RUN_STORE_DIR = "store"
IN_MEMORY_MAX_TOKENS = 50_000_000  # train.data_cache.DataCache.lm reads at most this much of a file / hub text source
IN_MEMORY_MAX_ROWS = 200_000  # and DataCache.sft at most this many prompt/response rows of a chat source


def reads_run_stores(rec, stage: str) -> bool:
    """True when the stage trains from StoreMixture over data_plan's stores: the recipe builds its sources into
    <run>/store, or every source names its prepared store (`store = NAME`; see the module doc)."""
    mix = rec.mixture(stage)
    if all(d.store for d in mix):
        return True
    return rec.data.build_stores and all(not d.is_chat and not d.source.startswith("hf:") for d in mix)


def prepared_path(rec, d) -> Path:
    """<[data] store_root>/<store> (an absolute `store` as given)."""
    p = Path(d.store)
    return p if p.is_absolute() else Path(rec.data.store_root) / p


def prepare_command(d, path: Path, tokenizer: Path) -> list[str]:
    """The `python -m train.data prepare` argv that builds source d's store at `path` (no interpreter path)."""
    cmd = ["python", "-m", "train.data", "prepare", "--source", d.source]
    if d.text_field:
        cmd += ["--text-field", d.text_field]
    if d.split:
        cmd += ["--split", d.split]
    if d.max_tokens:
        cmd += ["--max-tokens", str(d.max_tokens)]
    return cmd + ["--tokenizer", str(tokenizer), "--out", str(path)]


def prepared_stores(rec) -> list[tuple]:
    """(source, its store path) of every prepared store the recipe reads, each once, in stage order."""
    out: dict[Path, object] = {}
    for st in rec.stages:
        for d in rec.mixture(st.name):
            if d.store:
                out.setdefault(prepared_path(rec, d), d)
    return [(d, p) for p, d in out.items()]


def _built_from_other(d, path: Path) -> str | None:
    """Why the store at `path` is not the store of d (another source, field or split), or None."""
    try:
        fp = json.loads((path / MANIFEST).read_text()).get("source") or {}
    except (OSError, ValueError):
        return None
    want = dict(text_field=d.text_field or "text", split=d.split or "train")
    if d.source.startswith("hf:"):  # a local file may be named by another relative path: its hash decides on resume
        want["spec"] = d.source
    bad = [f"{k} {fp.get(k)!r}, not {v!r}" for k, v in want.items() if fp.get(k) != v]
    return f"store {path} was built from {fp.get('spec')!r} ({'; '.join(bad)})" if bad else None


def store_status(d, path: Path) -> str:
    """'built', 'partial' (an interrupted build: the same command continues it) or 'missing'."""
    return "built" if _complete(path) else "partial" if (path / MANIFEST).is_file() else "missing"


def not_built_line(rec, d, path: Path, run_dir: Path) -> str:
    state = "is partly built (the same command continues it)" if store_status(d, path) == "partial" else \
        "is not built yet"
    return (f"store {path} ({d.source}) {state}; build it with: "
            f"{shlex.join(prepare_command(d, path, run_dir / 'tokenizer.json'))}")


def check_prepared_stores(rec, run_dir: Path) -> None:
    """Before a run trains from prepared stores: every one the recipe names (all stages, so a missing mid-train
    store is not found after pre-training) is built, from its source. One-line StoreError otherwise."""
    todo = prepared_stores(rec)
    missing = [(d, p) for d, p in todo if store_status(d, p) != "built"]
    if missing:
        d, p = missing[0]
        more = f" ({len(missing) - 1} more not built: python -m train.prepare --config {rec.path} --out {run_dir} " \
               f"builds them all)" if len(missing) > 1 else ""
        raise StoreError(not_built_line(rec, d, p, run_dir) + more)
    for d, p in todo:
        why = _built_from_other(d, p)
        if why:
            raise StoreError(f"{why}; name another store for {d.source} or rebuild it")


def run_store_name(d) -> str:
    """<run>/store/<name> of a source: readable, and keyed by everything that changes its tokens."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", d.source).strip("_.")[-48:] or "source"
    key = json.dumps({k: v for k, v in d.as_dict().items() if k != "weight"}, sort_keys=True)  # not the tokens
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def store_paths(rec, stage: str, run_dir: Path) -> list[str]:
    """The store folder each source of a run-store stage reads (a prepared store as named)."""
    return [str(prepared_path(rec, d)) if d.store else d.source if is_store(d.source)
            else str(run_dir / RUN_STORE_DIR / run_store_name(d)) for d in rec.mixture(stage)]


def _shakespeare_docs(source: str, data_root: str) -> tuple[list[str], dict]:
    from train.data import HELDOUT_PLAYS, quality_text, shakespeare_splits  # noqa: PLC0415

    train = shakespeare_splits(data_root)[0]  # the held-out plays are not in it
    docs = train if source == "shakespeare:train" else [q for q in map(quality_text, train) if q]
    corpus = source_fingerprint(str(Path(data_root) / "texts"), "text", "train")
    return docs, dict(spec=source, corpus=corpus["content"], files=corpus["files"], heldout=list(HELDOUT_PLAYS))


def _complete(path: Path) -> bool:
    try:
        return bool(json.loads((path / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def ensure_run_stores(rec, stage: str, run_dir: Path, tok, data_root: str, rank: int = 0) -> list[str]:
    """Build (rank 0) or wait for (other ranks) the stage's run stores; returns store_paths(). Each rank
    then reads only its own rows, so nothing but the finished files is shared."""
    paths = store_paths(rec, stage, run_dir)
    for d, p in zip(rec.mixture(stage), paths):
        p = Path(p)
        if is_store(d.source) or d.store:  # prepared outside the run (check_prepared_stores)
            continue
        if rank != 0:
            _wait_for(p)
            continue
        if _complete(p):
            continue
        t0 = time.time()
        if d.source.startswith("shakespeare:"):
            docs, fp = _shakespeare_docs(d.source, data_root)
            man = build_store(d.source, tok, p, docs=docs, source_fp=fp, progress=False)
        else:
            man = build_store(d.source, tok, p, text_field=d.text_field or "text", split=d.split or "train",
                              max_tokens=d.max_tokens, progress=False)
        print(f"[{stage}] store {p}: {man['tokens']:,} tokens, {man['docs']:,} documents from {d.source} "
              f"({time.time() - t0:.1f} s)", file=sys.stderr)
    return paths


def _wait_for(p: Path) -> None:
    limit = 60 * float(os.environ.get("MMOE_DIST_TIMEOUT_MIN", 10))
    t0 = time.time()
    while not _complete(p):
        if time.time() - t0 > limit:
            raise StoreError(f"{p}: rank 0 did not finish building this store within {limit:.0f} s "
                             f"(MMOE_DIST_TIMEOUT_MIN)")
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------------------
# the plan
@dataclass
class SourcePlan:
    label: str
    weight: float
    rows_per_step: float
    unique: int | None       # targets in one pass over the source; None = not known offline
    unknown: str             # why unique is None ("" when known)
    planned: int             # targets the stage reads of it
    declared: bool | str = False  # True: the recipe's `tokens`; a str: that, capped by what the loader reads
    at_most: bool = False    # unique is the loader's cap, an upper bound (epochs: a lower bound)
    not_built: str = ""      # a prepared store that is not built: the line saying so, with its prepare command

    @property
    def epochs(self) -> float | None:
        return None if not self.unique else self.planned / self.unique


def stage_plan(rec, st, run_dir: Path) -> tuple[str, list[SourcePlan], list[str]]:
    """(the stage's loader in words, one SourcePlan per source, warnings). Reads manifests only."""
    mix = rec.mixture(st.name)
    weights = [d.mix_weight for d in mix]
    run_store = reads_run_stores(rec, st.name)
    srcs = store_paths(rec, st.name, run_dir) if run_store else [d.source for d in mix]
    stores = run_store or stage_uses_stores(srcs, [d.is_chat for d in mix], st.name)
    rows: list[float] = apportion(weights, st.global_batch) if stores else \
        [st.global_batch * w / sum(weights) for w in weights]   # the Batcher draws rows by weight
    T, plans = st.seq_len, []
    for d, src, r in zip(mix, srcs, rows):
        label = d.source + (f" (field {d.text_field})" if d.text_field else "") + (" (chat)" if d.format == "chat" else "")
        planned = round(st.steps * r * T)
        unique, why, declared, at_most, not_built = None, "", False, False, ""
        if d.store and not _complete(Path(src)):
            not_built = not_built_line(rec, d, Path(src), run_dir)
            why = "unknown (store partly built)" if store_status(d, Path(src)) == "partial" else \
                "unknown (store not built)"
            if d.tokens is not None:  # the recipe's planning figure until the manifest says
                unique, declared = (d.tokens if d.max_tokens is None else min(d.tokens, d.max_tokens)), True
        elif stores and (not run_store or is_store(d.source) or _complete(Path(src))):
            if d.store and _built_from_other(d, Path(src)):
                raise StoreError(f"{_built_from_other(d, Path(src))}; name another store for {d.source} or rebuild it")
            ts = open_stores([src])[0]  # an unfinished prepared store: the run would fail too, so fail here
            unique = (ts.n_tokens - 1) // T * T   # StoreMixture's windows of T targets
        elif d.tokens is not None:
            # what the loader can read of it: a store holds up to max_tokens, memory up to the default cap too
            cap = d.max_tokens if (run_store or d.is_chat) else (d.max_tokens or IN_MEMORY_MAX_TOKENS)
            unique, declared = (d.tokens if cap is None else min(d.tokens, cap)), True
            if unique < d.tokens:
                declared = "max_tokens" if d.max_tokens else "in-memory cap"
        elif not d.is_chat and d.source.startswith("shakespeare:") and _complete(
                run_dir / RUN_STORE_DIR / run_store_name(d)):
            # the same text, tokenized for an earlier stage of this run (the Batcher reads it all, any offset)
            unique = TokenStore(run_dir / RUN_STORE_DIR / run_store_name(d)).n_tokens
        elif run_store:
            why = "unknown (built in the run)"
        elif d.source.startswith("shakespeare:"):
            why = "unknown (run tokenizer)"
        elif d.is_chat:
            why = f"unknown (<= {d.max_rows or IN_MEMORY_MAX_ROWS:,} rows)"
        else:  # in memory: the loader reads at most its cap, so the cap bounds the epochs from below
            unique, at_most = d.max_tokens or IN_MEMORY_MAX_TOKENS, True
            declared = "max_tokens" if d.max_tokens else "in-memory cap"
        plans.append(SourcePlan(label, d.mix_weight, r, unique, why, planned, declared, at_most, not_built))
    if run_store and all(d.store for d in mix):
        how = f"prepared token stores ({rec.data.store_root}), StoreMixture"
    elif run_store:
        how = f"token stores built in the run ({run_dir / RUN_STORE_DIR}), StoreMixture"
    elif stores:
        how = "token stores, StoreMixture"
    else:
        why = "chat sources" if any(d.is_chat for d in mix) else "sources not prepared as token stores"
        how = f"in memory, Batcher ({why})"
    mx = rec.data.max_epochs
    warn = [f"stage {st.name}: {p.label}: " + (
        f">= {p.epochs:.1f} epochs ({p.planned:,} planned; in memory it reads at most {p.unique:,} tokens, "
        f"{p.declared}) "
        if p.at_most else f"{p.epochs:.1f} epochs ({p.planned:,} planned of {p.unique:,} unique tokens) ")
        + f"> [data] max_epochs {mx:g}" for p in plans if p.epochs is not None and p.epochs > mx]
    return how, plans, warn


def plan_lines(rec, st, run_dir: Path) -> list[str]:
    how, plans, warn = stage_plan(rec, st, run_dir)
    out = [f"data: {how}",
           f"  {'weight':>7} {'rows/step':>9} {'unique tokens':>28} {'planned tokens':>20} {'epochs':>10}  source"]
    for p in plans:
        tag = f" ({p.declared})" if isinstance(p.declared, str) else " (declared)" if p.declared else ""
        u = p.unknown if p.unique is None else f"{'<= ' if p.at_most else ''}{p.unique:,}{tag}"
        e = "-" if p.epochs is None else f"{'>= ' if p.at_most else ''}{p.epochs:.2f}"
        rows = f"{p.rows_per_step:.0f}" if float(p.rows_per_step).is_integer() else f"{p.rows_per_step:.1f}"
        out.append(f"  {p.weight:>7g} {rows:>9} {u:>28} {p.planned:>20,} {e:>10}  {p.label}")
    out += [f"  {p.not_built}" for p in plans if p.not_built]
    if any(p.not_built for p in plans):
        out.append(f"  every store of this recipe: python -m train.prepare --config {rec.path} --out {run_dir}")
    in_mem = [p for p, d in zip(plans, rec.mixture(st.name))
              if "in memory" in how and not d.is_chat and not d.source.startswith("shakespeare:") and not d.max_tokens]
    if in_mem:
        out.append(f"  note: in memory, a file / hub text source is read up to max_tokens (default "
                   f"{IN_MEMORY_MAX_TOKENS:,}) once; for more, prepare it (`python -m train.data prepare`) and "
                   f"name the store folder as the source")
    return out + [f"warning: {w}" for w in warn]


def mixture(rec, st, run_dir: Path, tok, data_root: str, seed: int, rank: int, world: int) -> StoreMixture:
    """The StoreMixture of a run-store stage (its stores built or waited for first)."""
    check_prepared_stores(rec, run_dir)  # the first store stage checks every stage's, before any training
    paths = ensure_run_stores(rec, st.name, run_dir, tok, data_root, rank)
    mix = rec.mixture(st.name)
    return StoreMixture(open_stores(paths, tok), [d.mix_weight for d in mix], st.seq_len, st.global_batch, seed,
                        names=[d.source for d in mix], rank=rank, world=world)

