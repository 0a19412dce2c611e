"""Token stores (train/store.py, `python -m train.data prepare`): build, kill + resume, the mixture loader's
pure-function batches, rank slices, epoch coverage, packing, memory. Local files only, no network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.chat_template import EOS, SPECIAL_TOKENS
from train.store import (
    MANIFEST,
    StoreError,
    StoreMixture,
    TokenStore,
    apportion,
    build_store,
    data_report,
    packing,
    permute,
    token_dtype,
    write_store,
)
from train.tokenizer import load_tokenizer, save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we when can").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 120))) for _ in range(1500)]
    docs[3] = ""  # an empty document: no tokens, no EOS, still a document index
    tok = train_bpe(docs[:300], 420, SPECIAL_TOKENS)
    save_tokenizer(tok, d / "tok.json")
    with open(d / "docs.jsonl", "w") as fh:
        for i, t in enumerate(docs):
            fh.write(json.dumps({"text": t}) + "\n")
            if i == 10:
                fh.write("{not json\n")        # malformed: skipped and counted
                fh.write(json.dumps({"other": 1}) + "\n")
    return dict(dir=d, docs=docs, tok=load_tokenizer(d / "tok.json"), tok_path=d / "tok.json", jsonl=d / "docs.jsonl")


def expected_stream(tok, docs) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False).ids
        if ids:
            out += ids + [eos]
    return np.array(out, dtype=np.int64)


def store_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def test_build_store_is_the_eos_separated_stream(corpus, tmp_path):
    man = build_store(str(corpus["jsonl"]), corpus["tok"], tmp_path / "s", shard_tokens=7000, progress=False)
    want = expected_stream(corpus["tok"], corpus["docs"])
    st = TokenStore(tmp_path / "s")
    assert st.dtype == np.uint16 and man["dtype"] == "uint16"
    assert st.n_tokens == want.size == man["tokens"]
    assert np.array_equal(st.read(0, st.n_tokens).astype(np.int64), want)
    sizes = [s["tokens"] for s in man["shards"]]
    assert len(sizes) >= 3 and all(n == 7000 for n in sizes[:-1]) and 0 < sizes[-1] <= 7000
    eos = corpus["tok"].token_to_id(EOS)
    assert man["docs"] == sum(1 for d in corpus["docs"] if d) == int((want == eos).sum())
    assert man["skipped"] == 2 and man["rows"] == len(corpus["docs"])
    # a read across a shard boundary, and each shard's recorded hash
    assert np.array_equal(st.read(6990, 20).astype(np.int64), want[6990:7010])
    import hashlib
    for s in man["shards"]:
        assert hashlib.sha256((tmp_path / "s" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    # rerunning a complete build is a no-op
    before = store_bytes(tmp_path / "s")
    build_store(str(corpus["jsonl"]), corpus["tok"], tmp_path / "s", shard_tokens=7000, progress=False)
    assert store_bytes(tmp_path / "s") == before


def test_txt_and_parquet_sources_match_jsonl(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for d in corpus["docs"][:200] if d]
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:04d}.txt").write_text(d)
    want = expected_stream(corpus["tok"], docs)
    for src, name in ((tmp_path / "d.parquet", "p"), (tmp_path / "txt", "t")):
        build_store(str(src), corpus["tok"], tmp_path / name, shard_tokens=3000, progress=False)
        st = TokenStore(tmp_path / name)
        assert np.array_equal(st.read(0, st.n_tokens).astype(np.int64), want), name


def test_token_dtype_uint16_vs_uint32(corpus, tmp_path):
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    big = load_tokenizer(corpus["tok_path"])
    big.add_tokens([f"<x{i}>" for i in range(65536)])
    assert big.get_vocab_size() > 65536
    docs = ["the of and <x65500> to", "in a <x3> is"]
    man = build_store("mem", big, tmp_path / "s", docs=docs, progress=False)
    st = TokenStore(tmp_path / "s")
    assert man["dtype"] == "uint32" and st.dtype == np.uint32
    got = st.read(0, st.n_tokens).astype(np.int64)
    assert np.array_equal(got, expected_stream(big, docs)) and got.max() > 65535


@pytest.mark.parametrize("fault,extra", [("shard_tmp:1", []), ("shard_renamed:1", []), ("manifest:0", []),
                                         ("manifest:3", []), ("manifest:1", ["--max-tokens", "31000"])])
def test_killed_build_resumes_byte_identical(corpus, tmp_path, fault, extra):
    cmd = [sys.executable, "-m", "train.data", "prepare", "--source", str(corpus["jsonl"]), "--tokenizer",
           str(corpus["tok_path"]), "--shard-tokens", "9000", "--batch-docs", "64", "--no-progress", *extra]
    ref = tmp_path / "ref"
    r = subprocess.run(cmd + ["--out", str(ref)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, MOBILEMOE_STORE_FAULT=fault)
    k = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert k.returncode == -9, (k.returncode, k.stderr)  # really SIGKILLed mid-build
    ref_shards = json.loads((ref / MANIFEST).read_text())["shards"]
    n_ref = len(ref_shards)
    assert all(s["next_skip"] > 0 for s in ref_shards[:4])  # the resumes below start inside a document
    man = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else dict(shards=[], complete=False)
    assert not man["complete"] and len(man["shards"]) < n_ref
    r = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert store_bytes(out) == store_bytes(ref)
    if extra:
        assert json.loads((ref / MANIFEST).read_text())["tokens"] == 31000
    assert not list(out.glob(".shard_*.tmp-*"))


def test_resume_refuses_a_different_build_and_foreign_folders(corpus, tmp_path):
    out = tmp_path / "s"
    build_store(str(corpus["jsonl"]), corpus["tok"], out, shard_tokens=5000, progress=False)
    with pytest.raises(StoreError, match="different shard_tokens"):
        build_store(str(corpus["jsonl"]), corpus["tok"], out, shard_tokens=4000, progress=False)
    other = train_bpe(corpus["docs"][:300], 300, SPECIAL_TOKENS)
    with pytest.raises(StoreError, match="different tokenizer"):
        build_store(str(corpus["jsonl"]), other, out, shard_tokens=5000, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a token store"):
        build_store(str(corpus["jsonl"]), corpus["tok"], tmp_path / "mine", progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # nothing written into it
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a damaged listed shard is named, not silently rebuilt over
    man = json.loads((out / MANIFEST).read_text())
    man["complete"] = False
    (out / MANIFEST).write_text(json.dumps(man))
    with open(out / "shard_00001.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(StoreError, match="shard_00001.bin.*damaged"):
        build_store(str(corpus["jsonl"]), corpus["tok"], out, shard_tokens=5000, progress=False)
    with pytest.raises(StoreError, match="unfinished store"):
        TokenStore(out)


def test_prepare_cli_errors_are_one_line(corpus, tmp_path):
    base = [sys.executable, "-m", "train.data", "prepare", "--no-progress"]
    cases = [(["--source", str(tmp_path / "nope.jsonl"), "--tokenizer", str(corpus["tok_path"]),
               "--out", str(tmp_path / "o")], "data file not found"),
             (["--source", str(corpus["jsonl"]), "--tokenizer", str(tmp_path / "no.json"),
               "--out", str(tmp_path / "o")], "tokenizer not found"),
             (["--source", str(corpus["jsonl"]), "--tokenizer", str(corpus["tok_path"]), "--out", str(tmp_path / "o"),
               "--eos-token", "<nope>"], "no end-of-document token"),
             (["--source", str(corpus["jsonl"]), "--tokenizer", str(corpus["tok_path"]), "--out", str(tmp_path / "o"),
               "--shard-tokens", "0"], "--shard-tokens")]
    for args, msg in cases:
        r = subprocess.run(base + args, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------------
# the loader
@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    out = []
    for name, n, shard in (("a", 40_000, 6000), ("b", 9_001, 2500)):
        toks = rng.integers(1, 300, size=n).astype(np.uint16)
        toks[rng.random(n) < 0.02] = 0  # EOS = 0
        write_store(d / name, [toks[i:i + shard] for i in range(0, n, shard)], vocab_size=300, eos_id=0)
        out.append((TokenStore(d / name), toks))
    return out


def mixture(two_stores, seed=0, B=8, T=16):
    return StoreMixture([s for s, _ in two_stores], [0.7, 0.3], T, B, seed=seed, names=["a", "b"])


def test_rows_read_the_planned_windows(two_stores):
    mix = mixture(two_stores)
    src, win = mix.plan(5)
    rows = mix.rows(5)
    assert rows.shape == (8, 17) and sorted(np.bincount(src, minlength=2)) == sorted([6, 2])
    for r in range(8):
        toks = two_stores[src[r]][1]
        assert np.array_equal(rows[r], toks[win[r] * 16: win[r] * 16 + 17])


def test_batches_are_a_pure_function_of_seed_and_step(two_stores):
    a = mixture(two_stores)
    first = [a.rows(s) for s in range(12)]
    b = mixture(two_stores)  # a "resumed" run: a new loader asked for step 7 first
    for s in (7, 11, 0, 3):
        assert np.array_equal(b.rows(s), first[s])
    assert not np.array_equal(first[1], first[2])
    assert not np.array_equal(mixture(two_stores, seed=1).rows(3), first[3])
    ids, mask = a.get(4)
    assert np.array_equal(ids.numpy(), first[4]) and mask.shape == (8, 16) and bool(mask.all())
    # a rank's Batcher-interface batch: its own rows read, the others' left 0
    ids1, _ = StoreMixture(a.stores, [0.7, 0.3], 16, 8, names=["a", "b"], rank=1, world=2).get(4)
    assert np.array_equal(ids1[4:].numpy(), first[4][4:]) and not ids1[:4].any()


def test_rank_slices_are_disjoint_and_make_the_global_batch(two_stores):
    mix = mixture(two_stores, B=8)
    for step in (0, 9):
        full = mix.rows(step)
        src, win = mix.plan(step)
        assert len(set(zip(src.tolist(), win.tolist()))) == 8  # no window twice in a step
        for world in (1, 2, 4, 8):
            parts = [mix.rows(step, r, world) for r in range(world)]
            assert all(p.shape[0] == 8 // world for p in parts)
            assert np.array_equal(np.concatenate(parts), full)
    with pytest.raises(StoreError, match="split evenly"):
        mix.rows(0, 0, 3)


def test_every_window_once_per_epoch(two_stores):
    mix = mixture(two_stores)
    nb = mix.windows[1]  # source b: 2 rows a step
    seen: list[int] = []
    step = 0
    while len(seen) < 2 * nb:
        src, win = mix.plan(step)
        seen += win[src == 1].tolist()
        step += 1
    assert sorted(seen[:nb]) == list(range(nb)) and sorted(seen[nb:2 * nb]) == list(range(nb))
    assert seen[:nb] != seen[nb:2 * nb]  # a fresh order each epoch
    for n in (1, 2, 3, 17, 1000, 4097):
        p = permute(np.arange(n), n, key=123)
        assert sorted(p.tolist()) == list(range(n))


def test_apportion_and_mixture_errors(two_stores):
    assert apportion([0.7, 0.3], 8) == [6, 2] and sum(apportion([1, 1, 1], 1024)) == 1024
    with pytest.raises(StoreError, match="gets no row"):
        StoreMixture([s for s, _ in two_stores], [0.99, 0.01], 16, 8)
    with pytest.raises(StoreError, match="weights"):
        StoreMixture([s for s, _ in two_stores], [1, -1], 16, 8)


def test_packing_doc_ids_and_positions():
    ids = np.array([[5, 6, 0, 7, 0, 0, 8, 9]])
    doc, pos = packing(ids, eos_id=0)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_store_rows_are_eos_separated_documents(corpus, tmp_path):
    build_store(str(corpus["jsonl"]), corpus["tok"], tmp_path / "s", shard_tokens=5000, progress=False)
    st = TokenStore(tmp_path / "s")
    mix = StoreMixture([st], [1.0], 64, 4)
    want = expected_stream(corpus["tok"], corpus["docs"])
    eos = corpus["tok"].token_to_id(EOS)
    src, win = mix.plan(2)
    rows = mix.rows(2)
    for r in range(4):
        assert np.array_equal(rows[r], want[win[r] * 64: win[r] * 64 + 65])
    all_rows = np.concatenate([mix.rows(s) for s in range(10)])
    assert (all_rows == eos).any()
    doc, _ = packing(all_rows, eos)
    # every document id change happens right after an EOS
    change = np.diff(doc, axis=1) != 0
    assert np.array_equal(change, all_rows[:, :-1] == eos)


def test_loader_holds_no_corpus(tmp_path):
    import resource  # noqa: F401  (Linux only: /proc below)

    n, shard = 24_000_000, 4_000_000  # 48 MB of uint16
    rng = np.random.default_rng(1)
    write_store(tmp_path / "big", (rng.integers(0, 50_000, size=min(shard, n - i)).astype(np.uint16)
                                   for i in range(0, n, shard)), vocab_size=50_000, eos_id=0)
    st = TokenStore(tmp_path / "big")
    mix = StoreMixture([st], [1.0], 2048, 64)

    # nothing the loader keeps is token-sized: walk its attributes
    def big_arrays(obj, depth=0):
        found = []
        for v in (vars(obj).values() if hasattr(obj, "__dict__") else []):
            if isinstance(v, np.ndarray) and v.size > 1024:
                found.append(v.size)
            elif isinstance(v, (list, tuple)):
                found += [len(v)] if len(v) > 1024 else []
                for x in v:
                    if depth < 2 and hasattr(x, "__dict__"):
                        found += big_arrays(x, depth + 1)
        return found

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    mix.rows(0)
    r0 = rss()
    for s in range(1, 200):  # 200 x 64 x 2049 tokens: about 1.1x the store's windows (26 MB read)
        mix.rows(s)
    grown = rss() - r0
    assert big_arrays(mix) == [] and big_arrays(st) == []
    assert grown < 12 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB reading a 48 MB store"


def test_data_report_warns_on_repeats(two_stores):
    stores = [s for s, _ in two_stores]
    use, warn = data_report(stores, [0.7, 0.3], 16, 8, steps=2000, names=["a", "b"], max_epochs=4)
    a, b = use
    assert a.rows_per_step == 6 and a.unique_tokens == ((40_000 - 1) // 16) * 16
    assert a.planned_tokens == 2000 * 6 * 16 and a.epochs == pytest.approx(2000 * 6 / ((40_000 - 1) // 16))
    assert [w.split(":")[0] for w in warn] == [n for n, u in (("a", a), ("b", b)) if u.epochs > 4]
    assert b.epochs > 4 and warn
    _, none = data_report(stores, [0.7, 0.3], 16, 8, steps=10, max_epochs=4)
    assert none == []


def test_open_stores_checks_the_run_tokenizer(corpus, tmp_path):
    from train.store import is_store, open_stores

    build_store(str(corpus["jsonl"]), corpus["tok"], tmp_path / "s", shard_tokens=50_000, progress=False)
    assert is_store(str(tmp_path / "s")) and not is_store(str(corpus["jsonl"])) and not is_store("hf:a/b")
    run_copy = load_tokenizer(corpus["tok_path"])
    run_copy.add_special_tokens(["<|extra|>"])  # the run's copy of a pretrained tokenizer: same base, more specials
    assert open_stores([str(tmp_path / "s")], run_copy)[0].n_tokens > 0
    other = train_bpe(corpus["docs"][:300], 300, SPECIAL_TOKENS)
    with pytest.raises(StoreError, match="another tokenizer"):
        open_stores([str(tmp_path / "s")], other)


def test_recipe_stage_reads_a_token_store(tmp_path, capsys, monkeypatch):
    """The trainer wiring: a stage whose source is a store folder trains from StoreMixture (dry run: epochs and
    the repeat warning; a mix of a store and a file is one line, exit 2)."""
    from model import cli
    from train import recipe as R
    from train.testing import make_corpus, read_log, stage_toml, write_recipe
    from train.tokenizer import prepare_tokenizer

    files = make_corpus(tmp_path / "c")
    run = tmp_path / "run"
    probe = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", files["train"], 3))
    tok, tok_path = prepare_tokenizer(R.load_recipe(None, str(probe)), run, "unused")
    build_store(files["train"], tok, tmp_path / "store", shard_tokens=1000, progress=False)
    cfg = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", str(tmp_path / "store"), 400))
    assert cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = next(ln.split() for ln in out.splitlines() if ln.endswith(f"  {tmp_path / 'store'}"))
    assert "data: token stores, StoreMixture" in out and row[:2] == ["1", "8"] and float(row[-2]) > 4
    assert f"warning: stage pretrain: {tmp_path / 'store'}: " in out
    calls = []
    real_get = StoreMixture.rank_batch
    monkeypatch.setattr(StoreMixture, "rank_batch", lambda self, step, rank=0, world=1:
                        calls.append(step) or real_get(self, step, rank, world))
    assert cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--max-steps", "2", "--no-generate",
                            "--threads", "1"]) == 0
    assert calls == [0, 1]  # the stage's batches came from the store loader
    log = read_log(run / "pretrain")
    assert [r["step"] for r in log] == [0, 1] and all(np.isfinite(r["loss"]) for r in log)
    mixed = stage_toml("pretrain", "pretrain", str(tmp_path / "store"), 3) + \
        '[[stages.data]]\nsource = "' + files["train"] + '"\nweight = 1.0\n'
    (tmp_path / "m").mkdir()
    cfg2 = write_recipe(tmp_path / "m", files, mixed)
    capsys.readouterr()
    assert cli.run(R.main, ["--config", str(cfg2), "--out", str(tmp_path / "run2"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixes token stores" in err[0]


def test_hub_source_is_streamed_never_listed(corpus, tmp_path, monkeypatch):
    """A hub id goes through datasets.load_dataset(..., streaming=True) and is consumed lazily: an endless
    (fake, offline) stream with --max-tokens ends, and its store is that stream's prefix."""
    import itertools

    import datasets

    seen = {}

    def endless():
        for i in itertools.count():
            yield {"text": corpus["docs"][i % len(corpus["docs"])]}

    def fake_load(name, conf=None, split=None, streaming=False):
        seen.update(name=name, conf=conf, split=split, streaming=streaming)
        return endless()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    man = build_store("hf:org/web:sample", corpus["tok"], tmp_path / "s", shard_tokens=4000, max_tokens=10_000,
                      progress=False)
    assert seen == dict(name="org/web", conf="sample", split="train", streaming=True)
    assert man["tokens"] == 10_000 and [s["tokens"] for s in man["shards"]] == [4000, 4000, 2000]
    want = expected_stream(corpus["tok"], corpus["docs"])[:10_000]
    assert np.array_equal(TokenStore(tmp_path / "s").read(0, 10_000).astype(np.int64), want)


def test_a_second_prepare_on_the_same_store_is_refused(corpus, tmp_path):
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    with open(out / ".prepare.lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running prepare holds it
        with pytest.raises(StoreError, match="another prepare is writing"):
            build_store(str(corpus["jsonl"]), corpus["tok"], out, progress=False)
    assert build_store(str(corpus["jsonl"]), corpus["tok"], out, progress=False)["complete"]
