"""The paper presets (S/M/L: 60 + 1 experts, top-4, sigmoid + top-k renormalisation, auxiliary-loss-free bias)
train through all four stages of their real stage table (train/configs/<size>.toml) at reduced width on CPU:
every stage's kind, schedule, LR, loss weights and the 2k -> 8k context ratio come from the file; only the
width, token counts, batch and data are shrunk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import get_config
from model.io import load_model_dir
from train.recipe_config import load_recipe_file
from train.testing import make_corpus, read_log

ROOT = Path(__file__).resolve().parents[1]
SEQ_2K = 16  # the pre-training context at reduced size; later stages keep the file's ratio (8k / 2k = 4)


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_stage_tables_carry_the_paper_recipe(size):
    rec = load_recipe_file(ROOT / "train" / "configs" / f"{size}.toml")
    assert rec.model == get_config(size)
    st = {s.name: s for s in rec.stages}
    assert list(st) == ["pretrain", "midtrain", "sft", "qat"]
    want = {"pretrain": (6e12, 2048, 4e-4, "cosine"), "midtrain": (500e9, 8192, 4e-5, "linear"),
            "sft": (126e9, 8192, 4e-6, "cosine"), "qat": (21e9, 8192, 4e-6, "cosine")}
    for name, (tokens, seq, lr, sched) in want.items():
        s = st[name]
        assert (s.tokens, s.seq_len, s.lr, s.schedule) == (tokens, seq, lr, sched), name
        assert s.lb_loss_weight == 0.0 and s.z_loss_weight == 1e-4, name
        assert s.qat == (name == "qat"), name
    assert rec.model.max_seq_len >= 8192


def _stage_toml(s, src: str, fmt: str | None, seq_len: int, steps: int) -> str:
    """One [[stages]] table: the real stage's recipe at `seq_len` and `steps` steps of 4 sequences."""
    lines = [
        "[[stages]]", f'name = "{s.name}"', f'kind = "{s.kind}"', f"qat = {str(s.qat).lower()}",
        f"tokens = {steps * seq_len * 4}", f"seq_len = {seq_len}", "global_batch = 4", "micro_batch = 2",
        f"lr = {s.lr!r}", f"min_lr = {s.min_lr!r}", f'schedule = "{s.schedule}"', f"warmup_frac = {s.warmup_frac!r}",
        f"weight_decay = {s.weight_decay!r}", f"grad_clip = {s.grad_clip!r}",
        f"lb_loss_weight = {s.lb_loss_weight!r}", f"z_loss_weight = {s.z_loss_weight!r}",
        "ckpt_every = 100", "log_every = 1",
        "[[stages.data]]", f'source = "{src}"', "weight = 1.0",
    ]
    if fmt:
        lines.append(f'format = "{fmt}"')
    return "\n".join(lines) + "\n"


def test_paper_preset_trains_through_all_four_stages(tmp_path):
    real = load_recipe_file(ROOT / "train" / "configs" / "S.toml")
    files = make_corpus(tmp_path / "data", n_docs=30)
    ratio = {s.name: s.seq_len // real.stages[0].seq_len for s in real.stages}
    assert ratio == {"pretrain": 1, "midtrain": 4, "sft": 4, "qat": 4}
    stages = ""
    for s in real.stages:
        chat = s.kind in ("sft", "qat")
        stages += _stage_toml(s, files["sft"] if chat else files["train"], "chat" if chat else None,
                              SEQ_2K * ratio[s.name], steps=2)
    # preset S with only the width shrunk: 60 experts, top-4, sigmoid, bias 1e-3 stay the preset's
    text = f"""size = "S"
seed = 0
[model]
preset = "S"
vocab_size = 320
d_model = 64
n_layers = 2
n_heads = 1
n_kv_heads = 1
expert_ffn_dim = 32
shared_ffn_dim = 32
max_seq_len = {SEQ_2K * 4}
moe_backend = "reference"

[tokenizer]
kind = "bpe"
vocab_size = 320
train_on = "{files['train']}"

[eval]
heldout = "{files['heldout']}"
max_tokens = 1024
seq_len = {SEQ_2K}

[hardware]
device = "cpu"
""" + stages
    recipe = tmp_path / "paper-S.toml"
    recipe.write_text(text)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "train", "--config", str(recipe), "--out", str(out), "--no-generate",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in real.stages:
        summ = json.loads((out / s.name / "summary.json").read_text())
        assert summ["steps"] == 2, (s.name, summ)
        log = [row for row in read_log(out / s.name) if "loss" in row]
        assert len(log) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in log), s.name
    final, meta = load_model_dir(out / "final")
    c = final.cfg
    assert (c.n_experts, c.top_k, c.n_shared_experts, c.router_score, c.norm_topk_prob) == (60, 4, 1, "sigmoid", True)
    assert c.router_bias_coeff == 1e-3 and meta.get("qat") and final.qat
    # auxiliary-loss-free balancing ran: 8 optimizer steps of +-1e-3 moved every layer's selection bias
    for layer in final.layers:
        b = layer.moe.expert_bias
        assert 0 < float(b.abs().max()) <= 8 * 1e-3 * (1 + 1e-5)
