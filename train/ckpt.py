"""Atomic, validated training checkpoints.

    <stage_dir>/ckpt/step_00000120/
        model.safetensors   full (unsharded) model state, fp32
        optim.pt            {"optim": optimizer state (FQN-keyed, full), "rng": RNG states}  (torch.load weights_only)
        state.json          step, data position, schedule step, config fingerprint, losses so far
        tokenizer.json      the run's tokenizer
        COMPLETE            written last

A checkpoint folder is written under a temporary name, every file fsynced, then renamed into place (and the
parent fsynced): a SIGKILL at any moment leaves either the previous checkpoints or the new one, never half of
one. Loading refuses (one-line ValueError) a folder that is incomplete, unreadable, or was written for a
different model / stage config (fingerprint mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.io import fsync_path


class CheckpointError(ValueError):
    pass


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = tuple(int(v) for v in st["python"].tolist())
    random.setstate((3, py, None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model_state: dict, optim_state: dict,
                    state: dict, tokenizer_json: str | os.PathLike | None, keep: int = 2) -> Path:
    """Write <stage_dir>/ckpt/step_<step> atomically; keep the newest `keep` checkpoints."""
    root = Path(stage_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.tmp-", dir=root))
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        torch.save({"optim": optim_state, "rng": rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        (tmp / "COMPLETE").write_text("ok\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(stage_dir: str | os.PathLike) -> list[Path]:
    root = Path(stage_dir) / "ckpt"
    if not root.is_dir():
        return []
    cks = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "COMPLETE").is_file()]
    return sorted(cks, key=lambda p: p.name)


def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(stage_dir)
    return cks[-1] if cks else None


def load_checkpoint(path: str | os.PathLike, expect_fingerprint: str | None = None) -> tuple[dict, dict, dict]:
    """-> (model_state, optim_payload {"optim", "rng"}, state dict). Raises CheckpointError with one line."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    for f in ("model.safetensors", "optim.pt", "state.json", "COMPLETE"):
        if not (p / f).is_file():
            raise CheckpointError(f"checkpoint {p} is incomplete (no {f})")
    try:
        state = json.loads((p / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {p}: corrupt state.json ({e})") from e
    if expect_fingerprint is not None and state.get("fingerprint") != expect_fingerprint:
        raise CheckpointError(f"checkpoint {p} was written for a different model/stage config "
                              f"(fingerprint {state.get('fingerprint')} != {expect_fingerprint})")
    try:
        model_state = load_file(str(p / "model.safetensors"))
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on corrupt files)
        raise CheckpointError(f"checkpoint {p}: corrupt model.safetensors ({e})") from e
    try:
        payload = torch.load(p / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p}: corrupt optim.pt ({e})") from e
    return model_state, payload, state
