"""The recipe's token-store path (train/data_plan.py): `[data] build_stores` builds a run's local text sources
into <run>/store (training plays only) and trains from StoreMixture; the dry run's per-stage data table
(unique vs planned tokens, epochs) and its `[data] max_epochs` warning. Offline: a synthetic Shakespeare-like
corpus in the layout `make data` writes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from model import cli
from train import data_plan
from train import recipe as R
from train.data import HELDOUT_PLAYS, shakespeare_works
from train.store import StoreMixture, TokenStore
from train.testing import MODEL, read_log, stage_toml

ROOT = Path(__file__).resolve().parent.parent
PLAYS = ("hamlet", "macbeth", "othello", "king_lear", "as_you_like_it", "sonnets") + HELDOUT_PLAYS
WORDS = ("the king queen lord lady speaks sees loves hates night day sword crown castle field sea fair foul "
         "good ill and but or my thy his her our sweet bitter noble gentle proud old young comes goes").split()


def fake_shakespeare(root: Path) -> Path:
    """<root>/texts/<play>_gut.txt: a title, then speeches (a speaker tag line, then verse) as the real plays."""
    rng = random.Random(1)
    (root / "texts").mkdir(parents=True)
    for k, name in enumerate(PLAYS):
        speakers = [f"{w.capitalize()}" for w in rng.sample(WORDS, 3)]
        blocks = [name.replace("_", " ").upper()]
        for _ in range(40 + 5 * k):
            verse = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(3))
            blocks.append(f"{rng.choice(speakers)}.\n{verse}")
        (root / "texts" / f"{name}_gut.txt").write_text("\n\n".join(blocks) + "\n")
    (root / ".complete").write_text("{}")
    return root


def shk_recipe(d: Path, stages: str, data: str = "build_stores = true\n") -> Path:
    text = f"""size = "tiny"
seed = 0
{MODEL}
[tokenizer]
kind = "bpe"
vocab_size = 320
train_on = "shakespeare:train"

[eval]
heldout = "shakespeare:heldout"
max_tokens = 2048
seq_len = 32

[hardware]
device = "cpu"

[data]
{data}""" + stages
    p = d / "recipe.toml"
    p.write_text(text)
    return p


def doc_hashes(ids: np.ndarray, eos: int) -> list[str]:
    """sha256 of each EOS-terminated document's token ids."""
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [hashlib.sha256(ids[a:b].astype(np.int64).tobytes()).hexdigest() for a, b in zip(starts, cuts)]


def test_tiny_recipe_builds_and_reads_a_store_without_the_heldout_plays(tmp_path, monkeypatch, capsys):
    shk = fake_shakespeare(tmp_path / "shk")
    stages = stage_toml("pretrain", "pretrain", "shakespeare:train", 4, ckpt_every=2) + \
        stage_toml("midtrain", "midtrain", "shakespeare:quality", 2).replace(
            'weight = 1.0\n', 'weight = 0.75\n[[stages.data]]\nsource = "shakespeare:train"\nweight = 0.25\n')
    cfg = shk_recipe(tmp_path, stages)
    run = tmp_path / "run"
    gets, reads = [], []
    real_get, real_read = StoreMixture.rank_batch, TokenStore.read
    monkeypatch.setattr(StoreMixture, "rank_batch", lambda self, step, rank=0, world=1:
                        gets.append((tuple(self.names), step)) or real_get(self, step, rank, world))
    monkeypatch.setattr(TokenStore, "read", lambda self, start, length, out=None: reads.append(self.path)
                        or real_read(self, start, length, out))
    args = ["--config", str(cfg), "--out", str(run), "--data-root", str(shk), "--no-generate", "--threads", "1"]
    # stop inside pre-training, then the same command finishes the run from the checkpoint and the same store
    assert cli.run(R.main, args + ["--max-steps", "2"]) == 0
    stores = sorted((run / data_plan.RUN_STORE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in stores] == ["shakespeare_train"]
    train_store = stores[0]
    man_mtime = (train_store / "manifest.json").stat().st_mtime_ns
    assert cli.run(R.main, args) == 0
    assert (train_store / "manifest.json").stat().st_mtime_ns == man_mtime  # reused, not rebuilt
    err = capsys.readouterr().err
    assert "[pretrain] data: token stores built in the run" in err and "[midtrain] data: token stores" in err
    # every training batch of both stages came from StoreMixture, and every token read from the run's stores
    assert [s for n, s in gets if n == ("shakespeare:train",)] == [0, 1, 2, 3]
    assert [s for n, s in gets if n == ("shakespeare:quality", "shakespeare:train")] == [0, 1]
    assert {p.resolve() for p in reads} == {p.resolve() for p in (run / "store").iterdir()}
    assert [r["step"] for r in read_log(run / "pretrain")] == [0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) for st in ("pretrain", "midtrain") for r in read_log(run / st))
    # the held-out plays are not in the training store: compare document content hashes
    from train.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer.json")
    ts = TokenStore(train_store)
    in_store = doc_hashes(ts.read(0, ts.n_tokens), ts.eos_id)
    works = shakespeare_works(shk)
    h = {n: doc_hashes(np.array(tok.encode(t, add_special_tokens=False).ids + [ts.eos_id]), ts.eos_id)[0]
         for n, t in works.items()}
    assert sorted(in_store) == sorted(v for n, v in h.items() if n not in HELDOUT_PLAYS)
    assert not set(in_store) & {h[n] for n in HELDOUT_PLAYS}
    man = json.loads((train_store / "manifest.json").read_text())
    assert man["source"]["heldout"] == list(HELDOUT_PLAYS) and man["docs"] == len(PLAYS) - len(HELDOUT_PLAYS)
    # the dry run of the finished run reads the stores' manifests: real sizes and epochs, no guesses
    capsys.readouterr()
    assert cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = next(ln.split() for ln in out.splitlines() if ln.endswith("  shakespeare:train"))
    unique = (ts.n_tokens - 1) // 32 * 32
    assert row == ["1", "8", f"{unique:,}", f"{4 * 8 * 32:,}", f"{4 * 8 * 32 / unique:.2f}", "shakespeare:train"]


def test_heldout_source_is_never_built_into_a_store(tmp_path):
    stages = stage_toml("pretrain", "pretrain", "shakespeare:heldout", 2)
    err = _parse_error(shk_recipe(tmp_path, stages))
    assert "[stages.1.data.1] source" in err and "never built into a training store" in err


def _parse_error(cfg: Path) -> str:
    from train.recipe_config import RecipeError, load_recipe_file

    with pytest.raises(RecipeError) as e:
        load_recipe_file(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("data, stage_extra, want", [
    ("max_epochs = 0\n", "", "[data] max_epochs: must be > 0"),
    ("max_epochs = \"4\"\n", "", "[data] max_epochs: expected a number"),
    ("max_epoch = 4\n", "", "[data] max_epoch: unknown key (did you mean 'max_epochs'?"),
    ("build_stores = 1\n", "", "[data] build_stores: expected true or false"),
    ("", "tokens = 0\n", "[stages.1.data.1] tokens: must be > 0"),
])
def test_data_keys_are_validated(tmp_path, data, stage_extra, want):
    (tmp_path / "t.txt").write_text("some text\n")
    stages = stage_toml("pretrain", "pretrain", str(tmp_path / "t.txt"), 2) + stage_extra
    assert want in _parse_error(shk_recipe(tmp_path, stages, data))


def test_declared_tokens_only_where_the_size_is_unknown(tmp_path):
    stages = stage_toml("pretrain", "pretrain", "shakespeare:train", 2) + "tokens = 1000\n"
    assert "[stages.1.data.1] tokens: only for file / hub sources" in _parse_error(shk_recipe(tmp_path, stages))


def _dry(capsys, cfg_args: list[str], out: Path) -> str:
    capsys.readouterr()
    assert cli.run(R.main, cfg_args + ["--out", str(out), "--dry-run"]) == 0
    return capsys.readouterr().out


def _rows(out: str, stage: str) -> dict[str, list[str]]:
    """{source: its row's cells} of one stage's data table in the plan."""
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.split()[:1] == [stage])
    i = next(k for k in range(i, len(lines)) if lines[k].split()[:1] == ["data:"]) - 1  # other lines may come first
    assert lines[i + 2].split() == ["weight", "rows/step", "unique", "tokens", "planned", "tokens", "epochs",
                                    "source"]
    rows = {}
    for ln in lines[i + 3:]:
        if not ln.startswith("         "):
            break
        cells = ln.split("  ")
        rows[cells[-1].strip()] = [c.strip() for c in cells if c.strip()]
    return rows


def test_dry_run_data_table_for_M_unknown_sizes_and_declared_tokens(tmp_path, capsys):
    out = _dry(capsys, ["--size", "M"], tmp_path / "m")
    pre = _rows(out, "pretrain")
    assert set(pre) == {"hf:HuggingFaceFW/fineweb-edu:sample-100BT", "hf:mlfoundations/dclm-baseline-1.0",
                        "hf:codeparrot/github-code-clean (field code)", "hf:HuggingFaceTB/finemath:finemath-3plus"}
    for cells in pre.values():  # weight, rows/step, unique, planned, epochs, source
        assert cells[2] == "unknown (store not built)" and cells[4] == "-"
    steps, T, B = 1_430_511, 2048, 2048
    assert pre["hf:mlfoundations/dclm-baseline-1.0"][:2] == ["0.25", "512"]
    assert pre["hf:mlfoundations/dclm-baseline-1.0"][3] == f"{steps * 512 * T:,}"
    assert sum(int(c[3].replace(",", "")) for c in pre.values()) == pytest.approx(steps * B * T, abs=4)
    assert "warning: stage pretrain" not in out and "warning: stage midtrain" not in out  # nothing is known
    # a declared small size: its epochs and the warning; a store-able size above the in-memory cap is capped
    text = (ROOT / "train/configs/M.toml").read_text()
    fm = 'source = "hf:HuggingFaceTB/finemath:finemath-3plus"\n'
    assert text.count(fm) == 1
    text = text.replace(fm, fm + "tokens = 40_000_000\n", 1)
    wiki = 'source = "hf:wikimedia/wikipedia:20231101.en"\n'
    text = text.replace(wiki, wiki + "tokens = 20_000_000_000\n", 1)
    assert text.count("max_epochs = 4 ") == 1
    text = text.replace("max_epochs = 4 ", "max_epochs = 2 ")
    (tmp_path / "M2.toml").write_text(text)
    out = _dry(capsys, ["--config", str(tmp_path / "M2.toml")], tmp_path / "m2")
    fmr = _rows(out, "pretrain")["hf:HuggingFaceTB/finemath:finemath-3plus"]
    planned = int(fmr[3].replace(",", ""))
    assert fmr[2] == "40,000,000 (declared)" and fmr[4] == f"{planned / 40e6:.2f}"
    assert (f"warning: stage pretrain: hf:HuggingFaceTB/finemath:finemath-3plus: {planned / 40e6:.1f} epochs "
            f"({planned:,} planned of 40,000,000 unique tokens) > [data] max_epochs 2") in out
    wr = _rows(out, "midtrain")["hf:wikimedia/wikipedia:20231101.en"]
    assert wr[2] == "20,000,000,000 (declared)"  # a store's planning figure until it is built
    # finemath, wikipedia, and QAT's two in-memory text sources (their cap bounds the epochs); nothing unknown
    assert sum(ln.strip().startswith("warning:") for ln in out.splitlines()) == 4
    assert "expert parallel: ep 4 (mesh dp_shard 16 x ep 4, 15 experts per rank)" in out


def test_max_epochs_sets_the_warning_threshold(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text\n")
    # 3 steps x 8 rows x 32 targets = 768 planned of a declared 300: 2.56 epochs
    stages = stage_toml("pretrain", "pretrain", str(tmp_path / "t.txt"), 3) + "tokens = 300\n"
    out = _dry(capsys, ["--config", str(shk_recipe(tmp_path, stages, ""))], tmp_path / "r")
    assert _rows(out, "pretrain")[str(tmp_path / "t.txt")][2:5] == ["300 (declared)", "768", "2.56"]
    assert "warning:" not in out  # the default max_epochs is 4
    (tmp_path / "b").mkdir()
    out = _dry(capsys, ["--config", str(shk_recipe(tmp_path / "b", stages, "max_epochs = 2.5\n"))], tmp_path / "r")
    assert "2.6 epochs (768 planned of 300 unique tokens) > [data] max_epochs 2.5" in out


def test_tiny_recipe_stages_and_their_loaders():
    rec = R.load_recipe("tiny")
    assert rec.data.build_stores and rec.data.max_epochs == 4
    assert [data_plan.reads_run_stores(rec, s) for s in rec.stage_names] == [True, True, False, False]
    assert all(d.source != "shakespeare:heldout" for s in rec.stage_names for d in rec.mixture(s))


def test_other_ranks_wait_for_rank_0s_store(tmp_path, monkeypatch):
    """Rank 0 builds a run store; the other ranks only wait for its finished manifest (one line on timeout)."""
    from model.chat_template import SPECIAL_TOKENS
    from train.recipe_config import load_recipe_file
    from train.store import StoreError
    from train.tokenizer import train_bpe

    docs = [" ".join(random.Random(i).choice(WORDS) for _ in range(60)) for i in range(20)]
    (tmp_path / "t").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "t" / f"{i:02d}.txt").write_text(d)
    rec = load_recipe_file(shk_recipe(tmp_path, stage_toml("pretrain", "pretrain", str(tmp_path / "t"), 2)))
    tok = train_bpe(docs, 300, SPECIAL_TOKENS)
    run = tmp_path / "run"
    monkeypatch.setenv("MMOE_DIST_TIMEOUT_MIN", "0.02")
    with pytest.raises(StoreError, match="rank 0 did not finish building this store within 1 s"):
        data_plan.ensure_run_stores(rec, "pretrain", run, tok, "unused", rank=1)
    assert not (run / "store").exists()  # a waiting rank writes nothing
    paths = data_plan.ensure_run_stores(rec, "pretrain", run, tok, "unused", rank=0)
    assert data_plan.ensure_run_stores(rec, "pretrain", run, tok, "unused", rank=1) == paths
    ts = TokenStore(paths[0])
    assert ts.manifest["docs"] == len(docs) and ts.manifest["source"]["spec"] == str(tmp_path / "t")
