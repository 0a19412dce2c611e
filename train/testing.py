"""Small synthetic recipes for the tests (no network, no Shakespeare download): a generated corpus, a
one-stage or four-stage TOML over local files, and a helper to read a stage's per-step log."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the king queen lord lady speaks sees loves hates night day sword crown castle field sea "
         "fair foul good ill and but or my thy his her our sweet bitter noble gentle proud old young "
         "comes goes stands falls sleeps wakes weeps laughs here there now then never always").split()


def make_corpus(d: Path, n_docs: int = 60, seed: int = 0) -> dict:
    """Writes train.txt / heldout.txt / sft.jsonl under d; returns their paths."""
    rng = random.Random(seed)
    # a tiny grammar: subject verb object clauses, so a model can learn real structure quickly
    def sentence():
        n = rng.randint(3, 9)
        return " ".join(rng.choice(WORDS[:20] if i % 2 == 0 else WORDS[20:]) for i in range(n)).capitalize() + "."

    def doc():
        return "\n".join(sentence() for _ in range(rng.randint(4, 10)))

    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text("\n\n".join(doc() for _ in range(n_docs)) + "\n")
    (d / "heldout.txt").write_text("\n\n".join(doc() for _ in range(max(4, n_docs // 6))) + "\n")
    with open(d / "sft.jsonl", "w") as fh:
        for _ in range(80):
            s = sentence()
            fh.write(json.dumps({"prompt": f"Repeat: {s}", "response": s}) + "\n")
    return dict(train=str(d / "train.txt"), heldout=str(d / "heldout.txt"), sft=str(d / "sft.jsonl"))


MODEL = """
[model]
preset = "tiny"
vocab_size = 320
d_model = 64
n_layers = 2
n_heads = 2
n_kv_heads = 1
n_experts = 4
top_k = 2
expert_ffn_dim = 32
n_shared_experts = 1
shared_ffn_dim = 32
max_seq_len = 64
"""


def stage_toml(name: str, kind: str, src: str, steps: int, *, qat: bool = False, fmt: str | None = None,
               lr: float = 3e-3, ckpt_every: int = 3, seq_len: int = 32, global_batch: int = 8,
               micro_batch: int = 4) -> str:
    return f"""
[[stages]]
name = "{name}"
kind = "{kind}"
qat = {str(qat).lower()}
tokens = {steps * seq_len * global_batch}
seq_len = {seq_len}
global_batch = {global_batch}
micro_batch = {micro_batch}
lr = {lr}
min_lr = {lr / 10}
schedule = "wsd"
warmup_frac = 0.1
ckpt_every = {ckpt_every}
log_every = 1
[[stages.data]]
source = "{src}"
weight = 1.0
""" + (f'format = "{fmt}"\n' if fmt else "")


def write_recipe(d: Path, files: dict, stages: str, seed: int = 0) -> Path:
    text = f"""size = "tiny"
seed = {seed}
{MODEL}
[tokenizer]
kind = "bpe"
vocab_size = 320
train_on = "{files['train']}"

[eval]
heldout = "{files['heldout']}"
max_tokens = 2048
seq_len = 32

[hardware]
device = "cpu"
""" + stages
    p = d / "recipe.toml"
    p.write_text(text)
    return p


def read_log(stage_dir: Path) -> list[dict]:
    f = Path(stage_dir) / "log.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []
