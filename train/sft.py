"""Instruction / response pairs derived from the plays' structure (the embedded default's SFT data).

Three tasks, chosen per speech by a seeded RNG so the set is deterministic:
  next     "Who speaks next?\\n\\n<SPEAKER>: <speech>"                   -> "<NEXT SPEAKER>"
  continue "Continue <SPEAKER>'s speech:\\n<first lines>"               -> "<following lines>"
  play     "Which play is this line from?\\n<one line of verse>"         -> "<Play Title>"
Held-out pairs come from the held-out plays (their "play" answers are titles the model never saw as answers).
"""

from __future__ import annotations

import random

from train.data import parse_speeches, play_title

TASKS = ("next", "continue", "play")


def play_pairs(text: str, seed: int = 0, max_pairs: int | None = None) -> list[tuple[str, str]]:
    title = play_title(text)
    sp = parse_speeches(text)
    rng = random.Random(f"{seed}:{title}")
    out: list[tuple[str, str]] = []
    for i, (speaker, body) in enumerate(sp):
        lines = [ln.strip() for ln in body.split("\n") if ln.strip()]
        task = TASKS[rng.randrange(len(TASKS))]
        if task == "next" and i + 1 < len(sp) and len(lines) <= 6:
            out.append((f"Who speaks next?\n\n{speaker}: {' '.join(lines)}", sp[i + 1][0]))
        elif task == "continue" and len(lines) >= 3:
            k = min(2, len(lines) - 1)
            out.append((f"Continue {speaker}'s speech:\n" + "\n".join(lines[:k]), "\n".join(lines[k:k + 3])))
        elif task == "play":
            line = max(lines, key=len)
            if len(line.split()) >= 5:
                out.append((f"Which play is this line from?\n{line}", title))
        if max_pairs is not None and len(out) >= max_pairs:
            break
    return out


def build_pairs(texts: list[str], seed: int = 0, max_pairs_per_play: int | None = None) -> list[tuple[str, str]]:
    out = []
    for t in texts:
        out.extend(play_pairs(t, seed, max_pairs_per_play))
    return out
