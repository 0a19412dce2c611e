"""The data path's speed and memory: tokenization into a token store, and the mixture loader reading one.

    python -m bench.data [--tokens 1_000_000_000] [--dir /tmp] [--text-mb 24] [--out bench/results/data.md]

1. Tokenization (`build_store`, the code `python -m train.data prepare` runs) over --text-mb of synthetic
   word text (Zipf-distributed pseudo-words, ~5 letters) with a byte-level BPE of 8192 trained here, once with
   TOKENIZERS_PARALLELISM=false (one core) and once with the default (all cores); tokens/s and tokens/s/core.
2. The loader (`StoreMixture.rows`, one process, one core): a synthetic store of --tokens uint16 tokens
   (1e9 = 2 GB, written to --dir and deleted at the end) read as 4096-token windows, 64 per step;
   tokens/s, and the process's RSS (anonymous / file-backed) before and after reading the same number of
   windows from a small (1/8) and the full store. The same reads through np.memmap are measured beside it:
   the reason the loader uses os.pread. The page cache is warm (the store was just written): this is the
   loader's own cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_TOK_SCRIPT = r"""
import json, sys, time
from train.store import build_store
from train.tokenizer import load_tokenizer
src, tok, out = sys.argv[1:4]
t = time.perf_counter()
man = build_store(src, load_tokenizer(tok), out, shard_tokens=1 << 22, progress=False)
print(json.dumps(dict(tokens=man["tokens"], seconds=time.perf_counter() - t)))
"""


def rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def synthetic_text(path: Path, mb: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(20000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    n = 0
    with open(path, "w") as fh:
        while n < mb << 20:
            words = rng.choice(len(vocab), size=rng.integers(50, 2000), p=p)
            doc = " ".join(vocab[w] for w in words)
            fh.write(json.dumps({"text": doc}) + "\n")
            n += len(doc)
    return n


def bench_tokenize(work: Path, text_mb: int) -> list[dict]:
    from model.chat_template import SPECIAL_TOKENS
    from train.tokenizer import save_tokenizer, train_bpe

    src = work / "text.jsonl"
    chars = synthetic_text(src, text_mb)
    with open(src) as fh:
        sample = [json.loads(next(fh))["text"] for _ in range(300)]
    save_tokenizer(train_bpe(sample, 8192, SPECIAL_TOKENS), work / "tok.json")
    rows = []
    ncpu = os.cpu_count() or 1
    for label, env in (("1 core", dict(TOKENIZERS_PARALLELISM="false")), (f"all {ncpu} cores", {})):
        out = work / f"store-{len(rows)}"
        r = subprocess.run([sys.executable, "-c", _TOK_SCRIPT, str(src), str(work / "tok.json"), str(out)],
                           env=dict(os.environ, **env), capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent)
        if r.returncode:
            raise SystemExit(f"tokenize run failed: {r.stderr.strip().splitlines()[-1:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        cores = 1 if label == "1 core" else ncpu
        rows.append(dict(run=label, chars=chars, tokens=res["tokens"], seconds=res["seconds"],
                         tok_s=res["tokens"] / res["seconds"], tok_s_core=res["tokens"] / res["seconds"] / cores))
        shutil.rmtree(out)
    return rows


def write_synthetic_store(path: Path, tokens: int, shard: int = 1 << 26) -> None:
    from train.store import write_store

    rng = np.random.default_rng(0)
    base = rng.integers(1, 49152, size=shard).astype(np.uint16)
    base[rng.random(shard) < 1 / 700] = 0  # EOS ~ every 700 tokens

    def shards():
        for k, i in enumerate(range(0, tokens, shard)):
            n = min(shard, tokens - i)
            yield ((base[:n].astype(np.uint32) + k) % 49152).astype(np.uint16)

    write_store(path, shards(), vocab_size=49152, eos_id=0, source="synthetic")


def bench_loader(store: Path, steps: int, T: int = 4096, B: int = 64, via: str = "pread") -> dict:
    from train.store import StoreMixture, TokenStore

    st = TokenStore(store)
    mix = StoreMixture([st], [1.0], T, B, seed=0)
    maps: dict[int, np.memmap] = {}

    def rows_memmap(step: int) -> np.ndarray:
        src, win = mix.plan(step)
        out = np.empty((B, T + 1), dtype=np.int64)
        for r, w in enumerate(win):
            start = int(w) * T
            k = int(np.searchsorted(st.starts, start, side="right")) - 1
            if start + T + 1 > st.starts[k + 1]:  # across a shard boundary: the rare case, read it plainly
                out[r] = st.read(start, T + 1)
                continue
            m = maps.get(k)
            if m is None:
                m = maps[k] = st.memmap(k)
            lo = start - int(st.starts[k])
            out[r] = m[lo:lo + T + 1]
        return out

    read = mix.rows if via == "pread" else rows_memmap
    read(0)
    before = rss()
    t = time.perf_counter()
    for s in range(1, steps + 1):
        read(s)
    dt = time.perf_counter() - t
    after = rss()
    return dict(via=via, store_tokens=st.n_tokens, steps=steps, tokens=steps * B * T, seconds=dt,
                tok_s=steps * B * T / dt, rss_before=before, rss_after=after)


def _loader_child(store: str, steps: int, via: str) -> None:
    print(json.dumps(bench_loader(Path(store), steps, via=via)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000_000)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--text-mb", type=int, default=24)
    p.add_argument("--steps", type=int, default=400, help="loader steps (x 64 x 4096 tokens) per measurement")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _loader_child(a.child[0], int(a.child[1]), a.child[2])
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=a.dir))
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}, "
             f"load average at start {os.getloadavg()[0]:.1f}"]
    try:
        tok_rows = bench_tokenize(work, a.text_mb)
        lines += ["", "| tokenize (build_store) | chars | tokens | s | tokens/s | tokens/s/core |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['chars']:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tok_s']:,.0f} | "
                  f"{r['tok_s_core']:,.0f} |" for r in tok_rows]
        free = shutil.disk_usage(work).free
        tokens = a.tokens
        if free < tokens * 2 * 1.15 + (1 << 30):
            tokens = int((free - (1 << 30)) / 2 / 1.15)
            lines.append(f"\n(disk short: the large store is {tokens:,} tokens, not {a.tokens:,})")
        small = tokens // 8
        t = time.perf_counter()
        write_synthetic_store(work / "big", tokens)
        write_synthetic_store(work / "small", small)
        t_write = time.perf_counter() - t
        res = []
        for via in ("pread", "memmap"):
            for st in ("small", "big"):
                r = subprocess.run([sys.executable, "-m", "bench.data", "--child", str(work / st), str(a.steps), via],
                                   capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                   cwd=Path(__file__).resolve().parent.parent)
                if r.returncode:
                    raise SystemExit(f"loader run failed: {r.stderr.strip().splitlines()[-1:]}")
                res.append(json.loads(r.stdout.strip().splitlines()[-1]))
        lines += ["", f"stores written: {tokens + small:,} uint16 tokens in {t_write:.0f} s; loader: one process, "
                      f"{a.steps} steps x 64 rows x 4096 tokens per measurement",
                  "", "| read via | store tokens | tokens/s (1 core) | RSS before | RSS after | anon after | "
                      "file-backed after |", "|---|---|---|---|---|---|---|"]
        mib = 2 ** 20
        lines += [f"| {r['via']} | {r['store_tokens']:,} | {r['tok_s']:,.0f} | {r['rss_before']['VmRSS'] / mib:.0f} MiB | "
                  f"{r['rss_after']['VmRSS'] / mib:.0f} MiB | {r['rss_after']['RssAnon'] / mib:.0f} MiB | "
                  f"{r['rss_after']['RssFile'] / mib:.0f} MiB |" for r in res]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_name(f".{Path(a.out).name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
