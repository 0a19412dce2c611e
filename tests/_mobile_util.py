"""Shared helpers for the phone-engine tests (build the C engine once, make small models)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "mobile" / "build"


def build_engine(*make_args: str) -> None:
    """make -C mobile/c [args]; raises with the compiler output on failure."""
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "mobile" / "c"), "-j2", *make_args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"make -C mobile/c {' '.join(make_args)} failed:\n{r.stdout}\n{r.stderr}")


def train_tiny_qat(steps: int = 60, seed: int = 0):
    """A tiny QAT model trained for a few seconds to follow a fixed cycle of tokens, so greedy decoding is
    non-trivial (many distinct tokens) and each step has a clear top-1 margin, unlike a random init whose
    greedy output repeats one token."""
    import torch  # noqa: PLC0415

    from model.config import get_config  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = get_config("tiny", max_seq_len=256, seed=seed)
    model = MobileMoE(cfg).set_qat(True)
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(cfg.vocab_size, generator=g)[:61]
    seq = cycle.repeat(4)[:192]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, 61, (4,), generator=g)
        x = torch.stack([seq[s:s + 96] for s in starts])
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + model.aux_loss()).backward()
        opt.step()
    model.eval()
    return model, cycle.tolist(), float(loss)
