"""Bad input to `python -m train`, `python -m model.config` and `python -m train.scaling`: every row is one
mistake a user can make, and each must end with exit 2, exactly one line on stderr naming the problem, no
traceback and nothing written. Recipe rows are edits of the shipped tiny recipe, checked with --dry-run (the
checks run before anything else, so a dry run refuses what a real run would). Most rows run in-process through
model.cli.run (the entry points' own wrapper); a few run the real `python -m ...` entry points."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import cli
from model import config as model_config
from model.config import PRESETS, ModelConfig
from train import recipe, scaling
from train.loop import StageConfig
from train.recipe_config import RecipeError, load_recipe_file, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = (ROOT / "train/configs/tiny.toml").read_text()
PRETRAIN_LR = "lr = 4e-3\n"  # the first stage's lr line in tiny.toml


def edit(old: str, new: str, count: int = 1):
    """A recipe row: tiny.toml with `old` replaced by `new` (the first `count` times; -1: all)."""
    def f(text: str) -> str:
        assert old in text, f"tiny.toml no longer contains {old!r}: update this row"
        return text.replace(old, new, count)
    return f


def append(extra: str):
    return lambda text: text + extra


def insert_after(anchor: str, extra: str):
    return edit(anchor, anchor + extra)


MIDTRAIN_W = 'source = "shakespeare:quality"\nweight = 0.8\n'

# (id, tiny.toml edit, expected substring of the one stderr line)
RECIPE_ROWS = [
    # --- the reported cases -------------------------------------------------------------------------------
    ("model-typo-key", insert_after('preset = "tiny"', "\nd_modle = 64"),
     "[model] d_modle: unknown key (did you mean 'd_model'?"),
    ("lr-string", edit(PRETRAIN_LR, 'lr = "4e-3"\n'), "[stages.1] lr: expected a number, got '4e-3' (a string)"),
    ("tokens-string", edit("tokens = 1_000_000", 'tokens = "1M"'), "[stages.1] tokens: expected an integer, got '1M'"),
    ("model-int-string", insert_after('preset = "tiny"', '\nn_layers = "4"'), "[model] n_layers: expected an integer"),
    ("stage-singular", edit("[[stages]]", "[[stage]]", -1), "unknown section [stage] (did you mean 'stages'?"),
    ("section-typo", edit("[model]", "[modle]"), "unknown section [modle] (did you mean 'model'?"),
    ("top-key-typo", edit("seed = 0", "sed = 0"), "unknown key 'sed' (did you mean 'seed'?"),
    ("device-tpu", edit('device = "cpu"', 'device = "tpu"'),
     "[hardware] device: unknown value 'tpu' (did you mean 'cpu'? expected one of auto | cpu | cuda)"),
    ("warmup-frac-1.5", edit("warmup_frac = 0.02", "warmup_frac = 1.5"), "[stages.1] warmup_frac: must be <= 1, got 1.5"),
    ("lr-negative", edit(PRETRAIN_LR, "lr = -4e-3\n"), "[stages.1] lr: must be > 0, got -0.004"),
    ("weight-negative", edit(MIDTRAIN_W, 'source = "shakespeare:quality"\nweight = -0.8\n'),
     "[stages.2.data.1] weight: must be >= 0, got -0.8"),
    ("micro-batch-not-dividing", edit("micro_batch = 16", "micro_batch = 5"),
     "[stages.1] micro_batch: 5 does not divide global_batch 16"),
    ("source-misspelt", edit('source = "shakespeare:train"\nweight = 1.0', 'source = "shakespeare:trian"\nweight = 1.0'),
     "[stages.1.data.1] source: unknown source 'shakespeare:trian' (did you mean 'shakespeare:train'?"),
    ("tokenizer-kind-typo", edit('kind = "bpe"', 'kind = "bpee"'),
     "[tokenizer] kind: unknown value 'bpee' (did you mean 'bpe'?"),
    # --- types -------------------------------------------------------------------------------------------
    ("invalid-toml", append("\nlr = = 3\n"), "invalid TOML"),
    ("qat-not-bool", edit("qat = true", 'qat = "yes"'), "[stages.4] qat: expected true or false, got 'yes'"),
    ("betas-one", edit("betas = [0.9, 0.95]", "betas = [0.9]"), "[stages.1] betas: expected 2 values, got 1"),
    ("betas-string", edit("betas = [0.9, 0.95]", 'betas = "0.9"'), "[stages.1] betas: expected an array"),
    ("lr-nan", edit(PRETRAIN_LR, "lr = nan\n"), "[stages.1] lr: must be finite, got nan"),
    ("weight-inf", edit(MIDTRAIN_W, 'source = "shakespeare:quality"\nweight = inf\n'),
     "[stages.2.data.1] weight: must be finite"),
    ("seed-float", edit("seed = 0", "seed = 0.5"), "seed: expected an integer, got 0.5 (a number)"),
    ("model-not-table", edit('[model]\npreset = "tiny"', 'model = "tiny"'), "[model]: must be a table, got a string"),
    ("dense-layers-type", insert_after('preset = "tiny"', '\ndense_layers = ["0"]'),
     "[model] dense_layers: expected an array of integers"),
    ("bool-as-int", insert_after('preset = "tiny"', "\nn_layers = true"), "[model] n_layers: expected an integer, got true"),
    # --- unknown keys / values ---------------------------------------------------------------------------
    ("stage-key-typo", edit("min_lr = 4e-4", "min_lrr = 4e-4"), "[stages.1] min_lrr: unknown key (did you mean 'min_lr'?"),
    ("data-key-typo", edit("weight = 1.0", "wieght = 1.0"), "[stages.1.data.1] wieght: unknown key (did you mean 'weight'?"),
    ("eval-key-typo", edit("max_tokens = 32768", "max_token = 32768"), "[eval] max_token: unknown key (did you mean 'max_tokens'?"),
    ("hardware-key-typo", edit("gpus = 1", "gpu = 1"), "[hardware] gpu: unknown key (did you mean 'gpus'?"),
    ("tokenizer-key-typo", edit("vocab_size = 2048", "vocab = 2048"), "[tokenizer] vocab: unknown key (did you mean 'vocab_size'?"),
    ("model-name-key", insert_after('preset = "tiny"', '\nname = "x"'), "[model] name: unknown key"),
    ("preset-typo", edit('preset = "tiny"', 'preset = "tinny"'), "[model] preset: unknown value 'tinny' (did you mean 'tiny'?"),
    ("stage-kind-typo", edit('kind = "pretrain"', 'kind = "pretrian"'),
     "[stages.1] kind: unknown value 'pretrian' (did you mean 'pretrain'?"),
    ("schedule-typo", edit('schedule = "cosine"', 'schedule = "cosin"'),
     "[stages.3] schedule: unknown value 'cosin' (did you mean 'cosine'?"),
    ("format-typo", insert_after('source = "shakespeare:sft"\nweight = 0.8', '\nformat = "chatt"'),
     "[stages.3.data.1] format: unknown value 'chatt' (did you mean 'chat'?"),
    ("router-score-typo", insert_after('preset = "tiny"', '\nrouter_score = "softmx"'),
     "[model] router_score: unknown value 'softmx' (did you mean 'softmax'?"),
    ("source-kind-typo", edit('source = "shakespeare:train"\nweight = 1.0', 'source = "hff:org/data"\nweight = 1.0'),
     "unknown source kind 'hff:' in 'hff:org/data' (did you mean 'hf:'?"),
    ("hub-source-empty", edit('source = "shakespeare:train"\nweight = 1.0', 'source = "hf:"\nweight = 1.0'),
     "[stages.1.data.1] source: malformed hub source 'hf:'"),
    ("data-file-missing", edit('source = "shakespeare:train"\nweight = 1.0', 'source = "/nonexistent/x.jsonl"\nweight = 1.0'),
     "[stages.1.data.1] source: data file not found: /nonexistent/x.jsonl"),
    ("tokenizer-train-on-missing", edit('train_on = "shakespeare:train"', 'train_on = "/nonexistent/t.txt"'),
     "[tokenizer] train_on: data file not found: /nonexistent/t.txt"),
    # --- ranges ------------------------------------------------------------------------------------------
    ("weights-all-zero", edit("weight = 1.0", "weight = 0.0"), "[stages.1] data: the mixture weights are all 0"),
    ("tokens-zero", edit("tokens = 1_000_000", "tokens = 0"), "[stages.1] tokens: must be > 0, got 0"),
    ("ckpt-every-zero", edit("ckpt_every = 100", "ckpt_every = 0"), "[stages.1] ckpt_every: must be > 0, got 0"),
    ("log-every-zero", insert_after("ckpt_every = 100", "\nlog_every = 0"), "[stages.1] log_every: must be > 0, got 0"),
    ("betas-above-1", edit("betas = [0.9, 0.95]", "betas = [0.9, 1.5]"), "[stages.1] betas: each must be in [0, 1)"),
    ("min-lr-above-lr", edit("min_lr = 4e-4", "min_lr = 4e-2"), "[stages.1] min_lr: 0.04 is above lr 0.004"),
    ("weight-decay-negative", edit("weight_decay = 0.1", "weight_decay = -0.1"), "[stages.1] weight_decay: must be >= 0"),
    ("seed-negative", edit("seed = 0", "seed = -1"), "seed: must be >= 0, got -1"),
    ("gpus-zero", edit("gpus = 1", "gpus = 0"), "[hardware] gpus: must be > 0, got 0"),
    ("model-layers-zero", insert_after('preset = "tiny"', "\nn_layers = 0"), "[model] n_layers: must be > 0, got 0"),
    ("model-rope-zero", insert_after('preset = "tiny"', "\nrope_theta = 0.0"), "[model] rope_theta: must be > 0"),
    ("model-quant-group-zero", insert_after('preset = "tiny"', "\nquant_group = 0"), "[model] quant_group: must be > 0"),
    ("model-top-k", insert_after('preset = "tiny"', "\ntop_k = 17"), "[model] top_k: top_k=17 exceeds n_experts=16"),
    ("model-dense-layer-range", insert_after('preset = "tiny"', "\ndense_layers = [9]"),
     "[model] dense_layers: layer 9 is outside 0..3"),
    ("bpe-vocab-small", edit("vocab_size = 2048", "vocab_size = 100"), "[tokenizer] vocab_size: must be >= 261, got 100"),
    # --- missing pieces ----------------------------------------------------------------------------------
    ("eval-missing", edit('heldout = "shakespeare:heldout"', 'heldot = "shakespeare:heldout"'),
     "[eval] heldot: unknown key (did you mean 'heldout'?"),
    ("eval-heldout-missing", edit('heldout = "shakespeare:heldout"          #', '#'), "[eval] heldout: missing (required)"),
    ("eval-section-missing", edit("[eval]", "[evals]"), "unknown section [evals] (did you mean 'eval'?"),
    ("tokenizer-kind-missing", edit('kind = "bpe"', '# kind = "bpe"'), "[tokenizer] kind: missing (required)"),
    ("no-stages", lambda t: t.split("# --- stage 1")[0], "[[stages]]: missing"),
    ("stage-name-missing", edit('name = "pretrain"', '# name'), "[stages.1] name: missing (required)"),
    ("stage-name-duplicate", edit('name = "midtrain"', 'name = "pretrain"'), "[stages.2] name: duplicate stage name 'pretrain'"),
    ("stage-name-path", edit('name = "pretrain"', 'name = "../pre"'), "[stages.1] name: '../pre': use letters"),
    ("stage-data-missing", lambda t: t.replace('[[stages.data]]\nsource = "shakespeare:train"\nweight = 1.0\n', "", 1),
     "[stages.1] data: missing"),
    ("pretrained-without-name",
     edit('kind = "bpe"             # byte-level BPE trained on the pre-training split, saved with the run\n'
          'vocab_size = 2048\ntrain_on = "shakespeare:train"', 'kind = "pretrained"'),
     "[tokenizer] name: missing: a pretrained tokenizer needs name (hub) or file"),
    # --- impossible combinations -------------------------------------------------------------------------
    ("seq-len-over-max", edit("seq_len = 128\nglobal_batch", "seq_len = 1024\nglobal_batch"),
     "[stages.1] seq_len: 1024 exceeds the model's max_seq_len 512"),
    ("eval-seq-len-over-max", edit("seq_len = 128\n\n[hardware]", "seq_len = 4096\n\n[hardware]"),
     "[eval] seq_len: 4096 exceeds the model's max_seq_len 512"),
    ("tokenizer-bigger-than-model", edit("vocab_size = 2048", "vocab_size = 4096"),
     "[tokenizer] vocab_size: 4096 exceeds [model] vocab_size 2048"),
    ("qat-kind-without-qat", edit("qat = true", "qat = false"), "[stages.4] qat: a stage of kind \"qat\" needs qat = true"),
    ("wsd-fractions-over-1", edit("warmup_frac = 0.02", "warmup_frac = 0.9"),
     "[stages.1] decay_frac: warmup_frac 0.9 + decay_frac 0.2 exceeds 1 (wsd)"),
    ("decay-frac-not-wsd", insert_after('schedule = "linear"', "\ndecay_frac = 0.2"),
     "[stages.2] decay_frac: only for schedule = \"wsd\""),
    ("cpu-with-gpus", edit("gpus = 1", "gpus = 4"), "[hardware] gpus: is a planning figure for device = \"cuda\""),
    ("cuda-gpus-not-dividing", edit('device = "cpu"\ngpus = 1', 'device = "cuda"\ngpus = 3'),
     "[stages.1] global_batch: 16 is not a multiple of micro_batch 16 x [hardware] gpus 3"),
    ("eval-heldout-chat-source", edit('heldout = "shakespeare:heldout"', 'heldout = "shakespeare:sft"'),
     "[eval] heldout: 'shakespeare:sft' is not a text source here"),
    ("eval-sft-text-source", edit('heldout_sft = "shakespeare:sft_heldout"', 'heldout_sft = "shakespeare:train"'),
     "[eval] heldout_sft: 'shakespeare:train' is not a chat source here"),
    ("chat-format-on-text-corpus", insert_after('source = "shakespeare:quality"\nweight = 0.8', '\nformat = "chat"'),
     "[stages.2.data.1] source: 'shakespeare:quality' is not a chat source here"),
    ("text-field-on-shakespeare", insert_after('source = "shakespeare:quality"\nweight = 0.8', '\ntext_field = "x"'),
     "[stages.2.data.1] text_field: only for file / hub sources"),
    ("bpe-with-name", insert_after("vocab_size = 2048", '\nname = "gpt2"'), "[tokenizer] name: only for kind = \"pretrained\""),
    ("hub-max-rows-on-text", edit('source = "shakespeare:train"\nweight = 1.0', 'source = "hf:org/d"\nmax_rows = 5'),
     "[stages.1.data.1] max_rows: only for chat sources"),
]


def _assert_bad(rc: int, out: str, err: str, expected: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], (expected, lines[0])


@pytest.mark.parametrize("row", RECIPE_ROWS, ids=[r[0] for r in RECIPE_ROWS])
def test_bad_recipe_is_one_line_before_anything_runs(row, tmp_path, capsys):
    _, change, expected = row
    cfg = tmp_path / "x.toml"
    cfg.write_text(change(TINY))
    out = tmp_path / "run"
    rc = cli.run(recipe.main, ["--config", str(cfg), "--dry-run", "--out", str(out)])
    cap = capsys.readouterr()
    _assert_bad(rc, cap.out, cap.err, expected)
    assert str(cfg) in cap.err  # names the file
    assert cap.out == ""  # refused before the plan: no half-printed plan
    assert not out.exists()


def test_error_names_the_shipped_file_relative(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match=r"^train/configs/x\.toml: \[stages\.1\] lr: must be > 0, got -0\.004$"):
        parse_recipe(edit(PRETRAIN_LR, "lr = -4e-3\n")(TINY), "train/configs/x.toml")


# ---- command-line rows of `python -m train` --------------------------------------------------------------
def _fake_ckpt(d: Path, stage: str, fingerprint: str = "x", tokenizer: bool = False) -> Path:
    d.mkdir(parents=True)
    for f in ("model.safetensors", "optim.pt", "COMPLETE"):
        (d / f).write_bytes(b"")
    (d / "state.json").write_text(json.dumps(dict(stage=stage, step=3, fingerprint=fingerprint)))
    if tokenizer:
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(d / "tokenizer.json"))
    return d


def _train_rows(tmp: Path) -> list[tuple[str, list[str], str]]:
    tiny = ["--size", "tiny", "--dry-run", "--out", str(tmp / "run")]
    noc = tmp / "notackpt"
    noc.mkdir()
    (tmp / "afile").write_text("x")
    bogus = _fake_ckpt(tmp / "bogus" / "ckpt" / "step_00000003", "finetune")
    mid = _fake_ckpt(tmp / "other" / "midtrain" / "ckpt" / "step_00000003", "midtrain")
    wrong = _fake_ckpt(tmp / "wrong" / "pretrain" / "ckpt" / "step_00000003", "pretrain", tokenizer=True)
    half = tmp / "half.toml"
    half.write_text("size = 'tiny'\n[model]\npreset = 'tiny'\nd_model = 'x'\n")
    return [
        ("max-steps-negative", [*tiny, "--max-steps", "-1"], "argument --max-steps: must be >= 1, got '-1'"),
        ("max-steps-zero", [*tiny, "--max-steps", "0"], "argument --max-steps: must be >= 1, got '0'"),
        ("max-steps-text", [*tiny, "--max-steps", "ten"], "argument --max-steps: expected an integer, got 'ten'"),
        ("threads-zero", [*tiny, "--threads", "0"], "argument --threads: must be >= 1, got '0'"),
        ("size-unknown", ["--size", "XL", "--dry-run"], "argument --size: expected tiny | S | M | L, got 'XL'"),
        ("size-and-config", ["--size", "S", "--config", str(half), "--dry-run"], "give --size or --config, not both"),
        ("config-missing", ["--config", str(tmp / "nope.toml"), "--dry-run"], "nope.toml: recipe file not found"),
        ("config-is-dir", ["--config", str(noc), "--dry-run"], "notackpt: not a file"),
        ("config-half-valid", ["--config", str(half), "--dry-run"], "[model] d_model: expected an integer, got 'x'"),
        ("unknown-option", [*tiny, "--dryrun"], "unrecognized arguments: --dryrun"),
        ("resume-missing", [*tiny, "--resume", "/nonexistent"], "--resume /nonexistent: no such checkpoint folder"),
        ("resume-file", [*tiny, "--resume", str(tmp / "afile")], "not a checkpoint folder (a file)"),
        ("resume-not-ckpt", [*tiny, "--resume", str(noc)], "not a complete checkpoint folder (no model.safetensors"),
        ("resume-other-recipe", [*tiny, "--resume", str(bogus)],
         "a checkpoint of stage 'finetune', which train/configs/tiny.toml does not have"),
        ("resume-later-stage-fresh-run", [*tiny, "--resume", str(mid)],
         f"a checkpoint of stage 'midtrain', but the earlier stage(s) pretrain are not done in {tmp / 'run'} "
         f"(this checkpoint's run folder looks like {tmp / 'other'}: pass --out {tmp / 'other'})"),
        ("resume-later-stage-real-run", ["--size", "tiny", "--out", str(tmp / "run"), "--resume", str(mid)],
         "the earlier stage(s) pretrain are not done"),
        ("resume-fingerprint", [*tiny, "--resume", str(wrong)], "written for a different model / stage 'pretrain' config"),
        ("stages-unknown", [*tiny, "--stages", "pretrian"], "--stages: unknown stage 'pretrian' in train/configs/tiny.toml (did you mean 'pretrain'?"),
        ("stages-gap", [*tiny, "--stages", "sft"], "--stages: stage 'pretrain' comes first and is not done"),
    ]


def test_bad_train_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = _train_rows(tmp_path)
    for name, argv, expected in rows:
        rc = cli.run(recipe.main, argv)
        cap = capsys.readouterr()
        try:
            _assert_bad(rc, cap.out, cap.err, expected)
            assert cap.out == ""
            assert not (tmp_path / "run").exists()
        except AssertionError as e:
            raise AssertionError(f"row {name}: {e}") from None
    assert len(rows) >= 19


def test_resume_later_stage_continues_that_stage(tmp_path, capsys, monkeypatch):
    """A midtrain checkpoint in a run whose pretrain is done resumes midtrain (it never restarts pretraining)."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    (run / "pretrain" / "model").mkdir(parents=True)
    (run / "pretrain" / "summary.json").write_text("{}")
    (run / "pretrain" / "model" / "config.json").write_text("{}")
    rec = recipe.load_recipe("tiny")
    ck_dir = _fake_ckpt(run / "midtrain" / "ckpt" / "step_00000003", "midtrain", tokenizer=True)
    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_file(str(ck_dir / "tokenizer.json")).get_vocab_size()
    state = json.loads((ck_dir / "state.json").read_text())
    state["fingerprint"] = recipe.stage_fingerprint(rec, rec.stages[1], n_tok)  # a checkpoint of this recipe
    (ck_dir / "state.json").write_text(json.dumps(state))
    assert recipe.check_resume(rec, str(ck_dir), run) == "midtrain"
    assert cli.run(recipe.main, ["--size", "tiny", "--dry-run", "--out", str(run), "--resume", str(ck_dir)]) == 0
    assert "plan:" in capsys.readouterr().out


# ---- python -m model.config ------------------------------------------------------------------------------
MODEL_CONFIG_ROWS = [
    (["--context", "-5"], "argument --context: must be >= 0, got '-5'"),
    (["--context", "2k"], "argument --context: expected an integer, got '2k'"),
    (["--size", "XXL"], f"argument --size: expected {cli.choices(list(PRESETS))}, got 'XXL'"),
    (["--all", "--context", "-1"], "argument --context: must be >= 0"),
    (["--sise", "S"], "unrecognized arguments: --sise"),
]


@pytest.mark.parametrize("argv, expected", MODEL_CONFIG_ROWS, ids=[" ".join(r[0]) for r in MODEL_CONFIG_ROWS])
def test_bad_model_config_arguments(argv, expected, capsys):
    rc = cli.run(model_config.main, argv)
    cap = capsys.readouterr()
    _assert_bad(rc, cap.out, cap.err, expected)
    assert cap.out == ""


def test_model_config_context_zero_is_the_floor(capsys):
    assert cli.run(model_config.main, ["--size", "tiny", "--json", "--context", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["flops_per_token_at_context"] == r["flops_per_token"]


# ---- python -m train.scaling -----------------------------------------------------------------------------
def _scaling_rows(tmp: Path) -> list[tuple[list[str], str]]:
    from train.scaling_law import LawParams

    fit = tmp / "fit.json"
    fit.write_text(json.dumps(dict(params={k: 1.0 for k in LawParams.__dataclass_fields__})))
    bad_fit = tmp / "bad.json"
    bad_fit.write_text("{not json")
    opt = ["optimize", "--memory-gb", "1", "--fit", str(fit)]
    return [
        ([*opt, "--active-flops", "1e9", "--bandwidth-gbs", "0"], "argument --bandwidth-gbs: must be > 0, got '0'"),
        ([*opt, "--active-flops", "1e9", "--frontier", "0"], "argument --frontier: must be >= 1, got '0'"),
        ([*opt, "--active-flops", "nan"], "argument --active-flops: must be finite, got 'nan'"),
        ([*opt, "--active-flops", "inf"], "argument --active-flops: must be finite, got 'inf'"),
        ([*opt, "--active-flops=-1e9"], "argument --active-flops: must be > 0"),
        ([*opt, "--active-flops", "-1e9"], "argument --active-flops: expected one argument"),
        ([*opt, "--latency-ms", "0"], "argument --latency-ms: must be > 0"),
        ([*opt, "--active-flops", "1e9", "--context", "0"], "argument --context: must be >= 1"),
        ([*opt, "--active-flops", "1e9", "--tokens=-6e12"], "argument --tokens: must be > 0"),
        ([*opt, "--active-flops", "1e9", "--base", "XL"], f"argument --base: expected {cli.choices(list(PRESETS))}, got 'XL'"),
        (["optimize", "--memory-gb=-3", "--active-flops", "1e9"], "argument --memory-gb: must be > 0"),
        (["optimize", "--memory-gb", "lots", "--active-flops", "1e9"], "argument --memory-gb: expected a number"),
        (["optimize", "--active-flops", "1e9"], "the following arguments are required: --memory-gb"),
        (opt, "give a compute budget: --active-flops and/or --latency-ms"),
        (["optimize", "--memory-gb", "1", "--active-flops", "1e9", "--fit", str(tmp / "none.json")], "no fitted law"),
        (["optimize", "--memory-gb", "1", "--active-flops", "1e9", "--fit", str(bad_fit)], "malformed fit JSON"),
        (["fit", str(tmp / "none.csv"), "--out", str(tmp / "o.json")], "no finished points to fit"),
        (["fit", "--starts", "0", "--out", str(tmp / "o.json")], "argument --starts: must be >= 1, got '0'"),
        (["fit", "--starts", "65", "--out", str(tmp / "o.json")], "argument --starts: must be <= 64, got '65'"),
        (["fit", "--n-boot", "-1", "--out", str(tmp / "o.json")], "argument --n-boot: must be >= 0"),
        (["sweep", "--grid", "gpu", "--dry-run"], "argument --grid: expected cpu | paper, got 'gpu'"),
        (["sweep", "--limit", "0", "--out", str(tmp / "s.csv")], "argument --limit: must be >= 1"),
        (["sweep", "--threads", "0", "--out", str(tmp / "s.csv")], "argument --threads: must be >= 1"),
        (["sweep", "--val-tokens", "-5", "--out", str(tmp / "s.csv")], "argument --val-tokens: must be >= 1"),
        (["sweep", "--grid", "paper", "--out", str(tmp / "s.csv"), "--limit", "1"], "this runner trains byte-level"),
        ([], "the following arguments are required"),
        (["optimise"], "invalid choice: 'optimise'"),
    ]


def test_bad_scaling_arguments(tmp_path, capsys):
    rows = _scaling_rows(tmp_path)
    before = set(tmp_path.iterdir())
    for argv, expected in rows:
        rc = cli.run(scaling.main, argv)
        cap = capsys.readouterr()
        try:
            _assert_bad(rc, cap.out, cap.err, expected)
        except AssertionError as e:
            raise AssertionError(f"row {argv}: {e}") from None
    assert set(tmp_path.iterdir()) == before  # nothing written
    assert len(rows) >= 26


# ---- the schema covers every field ---------------------------------------------------------------------------
def test_every_model_field_is_a_recipe_key():
    tiny = ModelConfig(name="tiny", **PRESETS["tiny"])
    for f in ModelConfig.__dataclass_fields__:
        if f == "name":
            continue
        v = getattr(tiny, f)
        lit = json.dumps(list(v)) if isinstance(v, tuple) else json.dumps(v)
        rec = parse_recipe(edit('preset = "tiny"', f'preset = "tiny"\n{f} = {lit}')(TINY), "t.toml")
        assert getattr(rec.model, f) == v, f


def test_every_stage_field_is_a_recipe_key():
    """A stage spelling out every StageConfig field (at its default) parses to exactly StageConfig's defaults."""
    d = StageConfig()
    lines = [f"{f} = {json.dumps(list(getattr(d, f)) if f == 'betas' else getattr(d, f))}"
             for f in StageConfig.__dataclass_fields__ if f != "data"]
    text = (TINY.split("# --- stage 1")[0] + "[[stages]]\n" + "\n".join(lines)
            + '\n[[stages.data]]\nsource = "shakespeare:train"\n')
    st = parse_recipe(text, "t.toml").stages[0]
    assert dataclasses.asdict(st) == dataclasses.asdict(StageConfig(data=[{"source": "shakespeare:train"}]))


# ---- every shipped recipe still parses and dry-runs --------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "S", "M", "L"])
def test_shipped_recipes_parse_and_dry_run(size, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rec = load_recipe_file(f"train/configs/{size}.toml")
    assert rec.path == f"train/configs/{size}.toml" and rec.size == size and rec.model.name == size
    assert rec.stage_names == ["pretrain", "midtrain", "sft", "qat"]
    assert all(rec.mixture(s) for s in rec.stage_names)
    out = tmp_path / "run"
    assert cli.run(recipe.main, ["--size", size, "--dry-run", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(f"plan: size {size} (train/configs/{size}.toml)") and cap.err == ""
    assert not out.exists()


def test_stage_fingerprint_input_is_the_mixture_as_written():
    """The stage config the checkpoint fingerprint hashes keeps the mixture exactly as the file writes it
    (no defaults added), so runs started before the schema existed still resume."""
    rec = parse_recipe(TINY, "t.toml")
    assert rec.stages[1].data == [{"source": "shakespeare:quality", "weight": 0.8},
                                  {"source": "shakespeare:train", "weight": 0.2}]


# ---- the real entry points ---------------------------------------------------------------------------------
def _py(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("args, expected", [
    (["-m", "train", "--dry-run", "--max-steps", "-1"], "argument --max-steps: must be >= 1"),
    (["-m", "model.config", "--context", "-5"], "argument --context: must be >= 0"),
    (["-m", "train.scaling", "optimize", "--memory-gb", "1", "--active-flops", "nan"], "must be finite"),
], ids=["train", "model.config", "train.scaling"])
def test_entry_points_exit_2_one_line(args, expected):
    r = _py(*args)
    _assert_bad(r.returncode, r.stdout, r.stderr, expected)


def test_dry_run_into_a_closed_pipe_is_quiet(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    # the reader is gone before the plan is written: the write fails with EPIPE, which must stay quiet
    p = subprocess.Popen([sys.executable, "-m", "train", "--size", "M", "--dry-run", "--out", str(tmp_path / "m")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err
    # and the shell form a user types
    r = subprocess.run(f"{sys.executable} -m train --size M --dry-run --out {tmp_path / 'm'} | head -1",
                       shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("plan: size M") and r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and r.stderr == ""
    assert not (tmp_path / "m").exists()


def test_train_help_shows_every_default():
    r = _py("-m", "train", "--help")
    assert r.returncode == 0
    opts = [ln for ln in r.stdout.split("options:")[1].splitlines() if ln.strip().startswith("--")]
    assert len(opts) >= 10
    body = r.stdout.split("options:")[1]
    assert body.count("(default:") == len(opts), body
