"""SIGKILL mid-stage + automatic resume == the uninterrupted run, step for step (deterministic CPU);
the wandb offline run directory of that run holds the logged metrics including the expert load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train.testing import make_corpus, read_log, stage_toml, write_recipe

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


def _env(wandb_mode: str) -> dict:
    env = dict(os.environ, WANDB_MODE=wandb_mode, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WANDB_API_KEY", None)
    return env


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "train", "--config", str(recipe), "--out", str(out), "--no-generate"]


def test_sigkill_resume_matches_uninterrupted_and_wandb_offline(tmp_path):
    files = make_corpus(tmp_path / "data")
    recipe = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", files["train"], STEPS, ckpt_every=4))

    # uninterrupted reference run, wandb offline
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(recipe, ref), cwd=ROOT, env=_env("offline"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref_log = read_log(ref / "pretrain")
    assert [x["step"] for x in ref_log] == list(range(STEPS))

    # killed run: SIGKILL once it is past a few checkpoints but not finished
    run = tmp_path / "killed"
    p = subprocess.Popen(_cmd(recipe, run), cwd=ROOT, env=_env("disabled"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(read_log(run / "pretrain")) < 14 and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_before = len(read_log(run / "pretrain"))
    assert 14 <= n_before < STEPS
    assert not (run / "pretrain" / "model").exists()

    r = subprocess.run(_cmd(recipe, run), cwd=ROOT, env=_env("disabled"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    got = read_log(run / "pretrain")
    assert [x["step"] for x in got] == list(range(STEPS))
    for a, b in zip(ref_log, got):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])  # exact, not approximate
        assert a["grad_norm"] == b["grad_norm"]
    s_ref = json.loads((ref / "pretrain" / "summary.json").read_text())
    s_got = json.loads((run / "pretrain" / "summary.json").read_text())
    assert s_ref["eval"]["heldout_loss"] == s_got["eval"]["heldout_loss"]

    # wandb offline: one run for the stage, grouped by the training run, holding loss + expert load
    from train.tracking import read_offline_run

    runs = sorted((ref / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    w = read_offline_run(runs[0])
    assert w["run"]["group"] == "ref" and w["run"]["name"] == "pretrain"
    assert "stage" in w["config"] and "model" in w["config"]
    keys = set().union(*w["history"])
    for k in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/router_entropy",
              "expert_load/layer0/e0", "expert_load/layer1/e3", "expert_load/layer0/max_over_mean",
              "eval/heldout_loss", "eval/unigram", "expert_load/table/_type", "expert_load/heatmap/_type"):
        assert k in keys, k
    losses = [json.loads(h["train/loss"]) for h in w["history"] if "train/loss" in h]
    assert len(losses) == STEPS and abs(losses[-1] - ref_log[-1]["loss"]) < 1e-9
    loads = [json.loads(h[f"expert_load/layer0/e{j}"]) for h in w["history"][:1] for j in range(4)]
    assert abs(sum(loads) - 1.0) < 1e-3  # token fractions over the 4 experts of layer 0
