"""Build the offline in-domain Shakespeare tasks (jsonl) that `make eval SUITE=local` runs through lm-eval.

    python -m bench.tasks.build_local [--root data/shakespeare] [--out bench/tasks]

Two 4-way multiple-choice tasks, each item built from one play with all three distractors taken from the SAME
play (same characters, vocabulary and metre, so a model cannot win on topic alone) and of similar length
(within 25% in characters, so an unconditional length prior does not pick the answer):

  shakespeare_nextline  context = the previous speech + the current speaker's lines so far;
                        choices = the true next verse line vs 3 lines from elsewhere in the play.
  shakespeare_cloze     context = the same, ending with the first half of a line (cut at a word boundary);
                        choices = the true second half vs the second halves of 3 other lines.
  shakespeare_order     context = as for nextline; choices = the true next line vs 3 random reorderings of
                        its words after the first (same words, same tokens: only word order, i.e. syntax and metre,
                        separates them; the unconditional word content is identical, so an untrained model
                        sits at chance and even a briefly trained one is measurably above it).

Splits: `test` comes only from the held-out plays of train.data (HELDOUT_PLAYS: never trained on);
`train` (few-shot examples, and the text the CI test's small trained fixture learns from) comes only from
the training plays. Deterministic (fixed seed): rebuilding from the same corpus gives identical files.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import sys
from pathlib import Path

TASKS = ("shakespeare_nextline", "shakespeare_cloze", "shakespeare_order")
N_TEST = 400  # items per task from the held-out plays
N_TRAIN = 600  # items per task from the training plays
MAX_CONTEXT_LINES = 6
N_CHOICES = 4
SEED = 1234


def _lines_of_play(text: str):
    """[(speech index, speaker, [verse lines])] for every speech of the play, stage directions dropped."""
    from train.data import parse_speeches  # noqa: PLC0415  (the training engineer's play parser: same speeches)

    out = []
    for i, (speaker, body) in enumerate(parse_speeches(text)):
        lines = [ln.strip() for ln in body.split("\n") if ln.strip()]
        if lines:
            out.append((i, speaker, lines))
    return out


def _context(speeches, si: int, li: int) -> str:
    """Previous speech (tag + lines) then the current speaker's tag and lines[:li]; last MAX_CONTEXT_LINES
    text lines at most (speaker tags always kept with their lines)."""
    parts = []
    if si > 0:
        _, psp, plines = speeches[si - 1]
        parts.append((psp, plines[-(MAX_CONTEXT_LINES - max(li, 1)):] if MAX_CONTEXT_LINES > li else []))
    _, sp, lines = speeches[si]
    parts.append((sp, lines[:li]))
    blocks = [f"{s}.\n" + "".join(ln + "\n" for ln in ls) for s, ls in parts if ls or s == sp]
    return "\n".join(blocks)


def _similar(pool_sorted: list[str], lens: list[int], target: str, rng: random.Random, exclude: set[str],
             k: int) -> list[str] | None:
    """k distinct entries of the length-sorted pool within 25% (at least 3 chars) of len(target)."""
    n = len(target)
    tol = max(3, int(0.25 * n))
    lo, hi = bisect.bisect_left(lens, n - tol), bisect.bisect_right(lens, n + tol)
    cands = sorted({p for p in pool_sorted[lo:hi] if p not in exclude})
    if len(cands) < k:
        return None
    return rng.sample(cands, k)


def _split_line(line: str) -> tuple[str, str] | None:
    """Cut at the word boundary nearest the middle; both halves must have >= 2 words."""
    words = line.split()
    if len(words) < 5:
        return None
    best = min(range(2, len(words) - 1), key=lambda i: abs(len(" ".join(words[:i])) - len(line) / 2))
    return " ".join(words[:best]), " ".join(words[best:])


def build_items(play: str, text: str, task: str, rng: random.Random, limit: int) -> list[dict]:
    """Up to `limit` items from random positions of one play."""
    speeches = _lines_of_play(text)
    all_lines = [ln for _, _, ls in speeches for ln in ls if len(ln) >= 12]
    if task != "shakespeare_cloze":
        pool = sorted(set(all_lines), key=lambda x: (len(x), x))
    else:
        pool = sorted({h[1] for h in (_split_line(ln) for ln in all_lines) if h}, key=lambda x: (len(x), x))
    lens = [len(x) for x in pool]
    positions = [(si, li) for si, (_, _, lines) in enumerate(speeches) for li in range(len(lines))]
    rng.shuffle(positions)
    items = []
    for si, li in positions:
        if len(items) >= limit:
            break
        lines = speeches[si][2]
        line = lines[li]
        if len(line) < 12 or (task != "shakespeare_cloze" and li == 0):
            continue  # next-line / order tasks need at least one line of the same speech as context
        if task == "shakespeare_order":
            words = line.split()
            shuffles: set[str] = set()
            for _ in range(50):
                if len(words) < 5 or len(shuffles) == N_CHOICES - 1:
                    break
                # the first word stays first: every choice is then the same multiset of byte-level BPE
                # pre-tokens (" word"), so the choices have identical token counts and an untrained model
                # has no length preference between them
                rest = words[1:]
                rng.shuffle(rest)
                cand = " ".join([words[0], *rest])
                if cand != line:
                    shuffles.add(cand)
            if len(shuffles) < N_CHOICES - 1:
                continue
            gold = rng.randrange(N_CHOICES)
            distract = sorted(shuffles)
            rng.shuffle(distract)
            choices = distract[:gold] + [line] + distract[gold:]
            items.append(dict(play=play, context=_context(speeches, si, li), choices=choices, gold=gold))
            continue
        if task == "shakespeare_nextline":
            gold_text, ctx = line, _context(speeches, si, li)
        else:
            h = _split_line(line)
            if h is None:
                continue
            ctx = _context(speeches, si, li) + h[0]
            gold_text = h[1]
        # nothing from the same speech: a distractor visible in the context would be a giveaway
        same_speech = {gold_text, *lines, *(h[1] for h in map(_split_line, lines) if h)}
        distract = _similar(pool, lens, gold_text, rng, same_speech, N_CHOICES - 1)
        if distract is None:
            continue
        gold = rng.randrange(N_CHOICES)
        choices = distract[:gold] + [gold_text] + distract[gold:]
        items.append(dict(play=play, context=ctx, choices=choices, gold=gold))
    return items


def build(root: str | os.PathLike, out: str | os.PathLike) -> dict[str, dict[str, int]]:
    from train.data import HELDOUT_PLAYS, shakespeare_works  # noqa: PLC0415

    works = shakespeare_works(root)
    from train.data import POEMS  # noqa: PLC0415

    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        counts[task] = {}
        for split, names, n in (("test", list(HELDOUT_PLAYS), N_TEST),
                                ("train", [w for w in works if w not in HELDOUT_PLAYS and w not in POEMS], N_TRAIN)):
            rng = random.Random(f"{SEED}-{task}-{split}")
            per_play = -(-2 * n // len(names))  # oversample, then shuffle across plays and cut to n
            items = []
            for name in names:
                items += build_items(name, works[name], task, rng, per_play)
            rng.shuffle(items)
            items = items[:n]
            for i, it in enumerate(items):
                it["id"] = f"{task}-{split}-{i}"
            path = out / f"{task}.{split}.jsonl"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as fh:
                for it in items:
                    fh.write(json.dumps(it, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
            counts[task][split] = len(items)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tasks.build_local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/shakespeare", help="corpus root (make data)")
    p.add_argument("--out", default=str(Path(__file__).parent), help="where the jsonl files go")
    a = p.parse_args(argv)
    try:
        counts = build(a.root, a.out)
    except (RuntimeError, OSError) as e:  # train.data.DataError is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t, c in counts.items():
        print(f"{t}: " + ", ".join(f"{s}={n}" for s, n in c.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
