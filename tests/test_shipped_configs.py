"""The shipped S / M / L recipes read prepared token stores for pre- and mid-training, with expert parallelism
ep = 4; the dry run shows a missing store with the exact `python -m train.data prepare` command (exit 0) and
the epochs an in-memory cap implies; a run with a missing store stops before training in one line (exit 2);
`python -m train.prepare` (`make data SIZE=M`) builds a recipe's stores, after which the dry run reads the
unique tokens from the manifest. Offline: hub sources are only ever named, never read."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from model import cli
from train import data_plan
from train import recipe as R
from train.prepare import main as prepare_main
from train.recipe_config import RecipeError, load_recipe_file
from train.store import TokenStore
from train.testing import make_corpus, read_log, stage_toml, write_recipe

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("S", "M", "L")


def _recipe(size: str):
    return load_recipe_file(ROOT / "train" / "configs" / f"{size}.toml")


@pytest.mark.parametrize("size", SIZES)
def test_shipped_configs_read_stores_with_ep4(size):
    rec = _recipe(size)
    assert rec.hardware.ep == 4 and rec.model.n_experts % 4 == 0 and rec.hardware.gpus % 4 == 0
    assert rec.data.store_root == "stores"
    for st in rec.stages:
        mix = rec.mixture(st.name)
        if st.kind in ("pretrain", "midtrain"):
            assert all(d.store and d.source.startswith("hf:") and not d.is_chat for d in mix), st.name
            assert data_plan.reads_run_stores(rec, st.name)
        else:  # chat pairs stay in memory, every cap written out
            assert not any(d.store for d in mix) and not data_plan.reads_run_stores(rec, st.name)
            assert all(d.max_rows if d.is_chat else d.max_tokens for d in mix), st.name
    # the paper's stage table (the weights the recipe had before it read stores)
    assert [d.mix_weight for d in rec.mixture("pretrain")] == [0.55, 0.25, 0.12, 0.08]
    assert [d.mix_weight for d in rec.mixture("midtrain")] == [0.3, 0.2, 0.2, 0.3]
    # pre-training's fineweb-edu is mid-training's replay: one store, built once
    names = [p.name for _, p in data_plan.prepared_stores(rec)]
    assert len(names) == len(set(names)) == 7 and "fineweb-edu-100BT" in names


def test_sizes_share_their_stores():
    """S, M and L use one tokenizer, so a store name means the same source (and is built once for all)."""
    built = [{p.name: (d.source, d.text_field) for d, p in data_plan.prepared_stores(_recipe(s))} for s in SIZES]
    assert built[0] == built[1] == built[2]
    assert len({_recipe(s).tokenizer.name for s in SIZES}) == 1


def test_dry_run_without_stores_prints_each_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # store_root "stores" is relative to the working directory: none here
    assert cli.run(R.main, ["--size", "M", "--out", "runs/M", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rec = _recipe("M")
    lines = [ln.strip() for ln in out.splitlines()]
    for d, p in data_plan.prepared_stores(rec):
        cmd = shlex.join(data_plan.prepare_command(d, p, Path("runs/M/tokenizer.json")))
        want = f"store {p} ({d.source}) is not built yet; build it with: {cmd}"
        assert want in lines, want
    assert "python -m train.data prepare --source hf:codeparrot/github-code-clean --text-field code " \
           "--tokenizer runs/M/tokenizer.json --out stores/github-code-clean" in out
    assert "expert parallel: ep 4 (mesh dp_shard 16 x ep 4, 15 experts per rank)" in out
    # QAT's text replay is in memory: its cap bounds the epochs from below, and that is warned
    qat = next(s for s in rec.stages if s.name == "qat")
    planned = round(qat.steps * qat.global_batch * 0.3 * qat.seq_len)
    row = next(ln.split() for ln in out.splitlines() if ln.endswith("  hf:HuggingFaceFW/fineweb-edu:sample-100BT")
               and "max_tokens" in ln)
    assert row[2:6] == ["<=", "50,000,000", "(max_tokens)", f"{planned:,}"]
    assert row[6:8] == [">=", f"{planned / 50e6:.2f}"]
    assert (f"warning: stage qat: hf:HuggingFaceFW/fineweb-edu:sample-100BT: >= {planned / 50e6:.1f} epochs "
            f"({planned:,} planned; in memory it reads at most 50,000,000 tokens, max_tokens) > "
            f"[data] max_epochs 4") in out
    assert "unknown (<= 200,000 rows)" in out  # SFT's chat cap, shown (its tokens are not known offline)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "stores").exists()  # a dry run writes nothing


def test_make_data_is_wired_to_the_prepare_commands(tmp_path, monkeypatch, capsys):
    make = subprocess.run(["make", "-n", "-C", str(ROOT), "data", "SIZE=M", "PRINT=1"], capture_output=True,
                          text=True, check=True).stdout
    assert "-m train.prepare --size M --out runs/M --print" in make
    assert "-m train.data fetch" in subprocess.run(["make", "-n", "-C", str(ROOT), "data"], capture_output=True,
                                                   text=True, check=True).stdout
    monkeypatch.chdir(tmp_path)
    assert cli.run(prepare_main, ["--size", "M", "--print"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# first: the run tokenizer runs/M/tokenizer.json")
    want = [shlex.join(data_plan.prepare_command(d, p, Path("runs/M/tokenizer.json")))
            for d, p in data_plan.prepared_stores(_recipe("M"))]
    assert out[1:] == want and len(want) == 7


def _local_recipe(d: Path, files: dict, store_root: Path, steps: int = 3) -> Path:
    """A CPU recipe whose pre-training reads one prepared store of a local text file."""
    return write_recipe(d, files, f'\n[data]\nstore_root = "{store_root}"\n'
                        + stage_toml("pretrain", "pretrain", files["train"], steps) + 'store = "train-text"\n')


def test_run_with_a_missing_store_stops_before_training(tmp_path, capsys):
    files = make_corpus(tmp_path / "corpus", n_docs=20)
    cfg = _local_recipe(tmp_path, files, tmp_path / "stores")
    run = tmp_path / "run"
    rc = cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--no-generate", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err  # one line, at once
    want = (f"store {tmp_path / 'stores' / 'train-text'} ({files['train']}) is not built yet; build it with: "
            f"python -m train.data prepare --source {files['train']} --tokenizer {run / 'tokenizer.json'} "
            f"--out {tmp_path / 'stores' / 'train-text'}")
    assert want in err
    assert not (run / "pretrain" / "ckpt").exists() and not read_log(run / "pretrain")  # no step was taken


def test_prepared_local_store_feeds_the_plan_and_the_run(tmp_path, capsys):
    files = make_corpus(tmp_path / "corpus", n_docs=30)
    stores = tmp_path / "stores"
    cfg = _local_recipe(tmp_path, files, stores, steps=3)
    run = tmp_path / "run"
    # python -m train.prepare: the run tokenizer (trained as the run would), then `train.data prepare` per store
    assert cli.run(prepare_main, ["--config", str(cfg), "--out", str(run)]) == 0
    assert (run / "tokenizer.json").is_file()
    ts = TokenStore(stores / "train-text")
    assert ts.n_tokens > 1000
    capsys.readouterr()
    assert cli.run(prepare_main, ["--config", str(cfg), "--out", str(run), "--print"]) == 0
    assert capsys.readouterr().out.startswith("# built: python -m train.data prepare --source ")
    assert cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: prepared token stores ({stores}), StoreMixture" in out
    unique, planned = (ts.n_tokens - 1) // 32 * 32, 3 * 8 * 32
    row = next(ln.split() for ln in out.splitlines() if ln.endswith(f"  {files['train']}"))
    assert row == ["1", "8", f"{unique:,}", f"{planned:,}", f"{planned / unique:.2f}", files["train"]]
    assert "not built" not in out
    # the run trains from it (two steps, then stops)
    assert cli.run(R.main, ["--config", str(cfg), "--out", str(run), "--no-generate", "--threads", "1",
                            "--max-steps", "2"]) == 0
    assert "[pretrain] data: prepared token stores" in capsys.readouterr().err
    assert [r["step"] for r in read_log(run / "pretrain")] == [0, 1]


def test_a_store_built_from_another_source_is_refused(tmp_path, capsys):
    files = make_corpus(tmp_path / "corpus", n_docs=20)
    stores = tmp_path / "stores"
    cfg = _local_recipe(tmp_path, files, stores)
    run = tmp_path / "run"
    assert cli.run(prepare_main, ["--config", str(cfg), "--out", str(run)]) == 0
    # the same store name, now said to hold the jsonl's "response" field: the manifest disagrees
    text = cfg.read_text().replace(f'source = "{files["train"]}"\n',
                                   f'source = "{files["sft"]}"\ntext_field = "response"\n')
    (tmp_path / "b.toml").write_text(text)
    capsys.readouterr()
    assert cli.run(R.main, ["--config", str(tmp_path / "b.toml"), "--out", str(run), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"store {stores / 'train-text'} was built from" in err
    assert "text_field 'text', not 'response'" in err


@pytest.mark.parametrize("edit, want", [
    (lambda t: t.replace('store = "fineweb-edu-100BT"\nweight = 0.55', 'weight = 0.55', 1),
     "[stages.1.data.1] store: missing: the stage's other sources read token stores"),
    (lambda t: t.replace('max_rows = 200_000\nweight = 0.6', 'store = "chat"\nweight = 0.6', 1),
     "[stages.3.data.1] store: only for text sources"),
    (lambda t: t.replace('store = "dclm-baseline"', 'store = "fineweb-edu-100BT"', 1),
     "[stages.1.data.2] store: 'fineweb-edu-100BT' is built from 'hf:HuggingFaceFW/fineweb-edu:sample-100BT'"),
    (lambda t: t.replace('store = "wikipedia-en"', 'store = ".."', 1),
     "[stages.2.data.2] store: '..': name a folder"),
    (lambda t: t.replace('store_root = "stores"', 'store_root = 3', 1),
     "[data] store_root: expected a string"),
])
def test_store_keys_are_validated(tmp_path, edit, want):
    text = (ROOT / "train/configs/M.toml").read_text()
    new = edit(text)
    assert new != text
    (tmp_path / "M.toml").write_text(new)
    with pytest.raises(RecipeError) as e:
        load_recipe_file(tmp_path / "M.toml")
    assert want in str(e.value) and "\n" not in str(e.value)


def test_prepare_cli_bad_input_is_one_line(capsys):
    assert cli.run(prepare_main, ["--config", str(ROOT / "train/configs/tiny.toml"), "--print"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no source names a prepared store" in err
    assert cli.run(prepare_main, []) == 2 and "give --size or --config" in capsys.readouterr().err


@pytest.mark.parametrize("size", SIZES)
def test_pretrained_tokenizer_with_the_chat_tokens_fits_the_preset_vocab(size, tmp_path):
    """The run tokenizer is SmolLM2's 49152 entries (<|endoftext|> among them) plus our other chat tokens; a
    run refuses a tokenizer larger than the model's vocab_size, so the preset must hold them all. A stand-in
    with SmolLM2's size and its <|endoftext|> at id 0 keeps this offline."""
    import dataclasses

    from tokenizers import Tokenizer, models

    from train.tokenizer import prepare_tokenizer

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, 49152)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(tmp_path / "smollm2-size.json"))
    rec = _recipe(size)
    assert rec.tokenizer.kind == "pretrained"
    tk = dataclasses.replace(rec.tokenizer, file=str(tmp_path / "smollm2-size.json"))
    rec = dataclasses.replace(rec, tokenizer=tk)
    tok, _ = prepare_tokenizer(rec, tmp_path, str(tmp_path))
    assert tok.get_vocab_size() == 49155  # three chat tokens were added
    assert tok.get_vocab_size() <= rec.model.vocab_size and rec.model.vocab_size % 64 == 0
