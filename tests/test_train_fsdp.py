"""torchrun + FSDP2 on gloo: 2 ranks with the same global batch reproduce the 1-rank per-step losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.testing import make_corpus, read_log, stage_toml, write_recipe

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5


def _run(cmd, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp2_two_ranks_equal_one_rank(tmp_path):
    files = make_corpus(tmp_path / "data")
    # global batch 8, micro-batch 4: 1 rank accumulates 2 micro-batches, 2 ranks run 1 each
    recipe = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", files["train"], STEPS, ckpt_every=100))
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "train", "--config", str(recipe), "--out", str(one), "--no-generate"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
          "--config", str(recipe), "--out", str(two), "--no-generate"], tmp_path)
    a, b = read_log(one / "pretrain"), read_log(two / "pretrain")
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(STEPS))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
    # training moved the weights the same way: the saved models agree
    from model.io import load_model_dir

    m1, _ = load_model_dir(one / "pretrain" / "model")
    m2, _ = load_model_dir(two / "pretrain" / "model")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert (s1[k] - s2[k]).abs().max() < 1e-4, k
