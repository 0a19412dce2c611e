"""Build every prepared token store a recipe reads: `python -m train.prepare --size M` (`make data SIZE=M`).

    python -m train.prepare --size M --print      # list the commands, run nothing (no network)
    python -m train.prepare --size M              # the run tokenizer, then each store not built yet
    python -m train.prepare --config my.toml --out runs/x

The recipe's `store = NAME` sources (train/data_plan.py) are built with `python -m train.data prepare`,
each store once even when several stages read it, in stage order, as a child process running exactly the
printed command (so a store can also be built by hand, or on several hosts at once, one command each). The
tokenizer the stores are built with is the run's, <out>/tokenizer.json, written first the way the run writes
it (the pretrained tokenizer + the chat special tokens); the run then reads that same file. A finished store
is skipped; an interrupted one is continued by the same command (train/store.py). Hub sources need the
network here; `--print` does not.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from model import cli
from train import data_plan
from train.recipe_config import load_recipe_file

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SIZES = ("tiny", "S", "M", "L")


def commands(rec, out: Path) -> list[tuple[str, list[str]]]:
    """(status, prepare argv) per prepared store of the recipe; status is data_plan.store_status()."""
    return [(data_plan.store_status(d, p), data_plan.prepare_command(d, p, out / "tokenizer.json"))
            for d, p in data_plan.prepared_stores(rec)]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m train.prepare", __doc__)
    p.add_argument("--size", type=cli.one_of(SIZES), default=None, metavar="S|M|L",
                   help="the recipe train/configs/<size>.toml")
    p.add_argument("--config", default=None, metavar="TOML", help="a recipe file instead of a size's (not with --size)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the run directory whose tokenizer.json the stores are built with; unset: runs/<size> or "
                        "runs/<config stem>, as python -m train")
    p.add_argument("--data-root", default="data/shakespeare", metavar="DIR",
                   help="the offline corpus, for a recipe whose BPE tokenizer trains on it")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the prepare commands (a finished store's as a comment) and exit")
    a = p.parse_args(argv)
    if (a.size is None) == (a.config is None):
        raise cli.BadInput("give --size or --config (one of them)")
    rec = load_recipe_file(a.config or CONFIG_DIR / f"{a.size}.toml")
    out = Path(a.out or f"runs/{a.size or Path(a.config).stem}")
    todo = commands(rec, out)
    if not todo:
        raise cli.BadInput(f"{rec.path}: no source names a prepared store (store = NAME); nothing to prepare")
    if a.print_only:
        if not (out / "tokenizer.json").is_file():
            print(f"# first: the run tokenizer {out / 'tokenizer.json'} (python -m train.prepare "
                  f"{'--size ' + a.size if a.size else '--config ' + a.config} --out {out} writes it)")
        for status, cmd in todo:
            print(("# built: " if status == "built" else "") + shlex.join(cmd))
        return 0
    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        # the run's own tokenizer code (train/recipe.py), so the stores match what the run will load
        from train.recipe import prepare_tokenizer  # noqa: PLC0415  (torch; not needed for --print)

        prepare_tokenizer(rec, out, a.data_root)
        print(f"tokenizer: {tok_path}", file=sys.stderr)
    for status, cmd in todo:
        if status == "built":
            print(f"built already: {cmd[-1]}", file=sys.stderr)
            continue
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run([sys.executable, *cmd[1:]]).returncode
        if rc:
            # the child printed its own one-line error; stop at the first failure, the rest can be rerun
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
