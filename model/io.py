"""A model directory: the hand-off format between train/, mobile/ export, bench/ eval and model/hf.py.

    <dir>/config.json         ModelConfig.to_dict() (+ "qat": bool, whether the weights were QAT-trained)
    <dir>/model.safetensors   the MobileMoE state_dict, fp32 (buffers such as expert_bias included)
    <dir>/tokenizer.json      optional: a `tokenizers` tokenizer (byte-level BPE); absent = raw bytes

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.model import MobileMoE


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_dir(model: MobileMoE, out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None,
                   extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg = model.cfg.to_dict()
        meta = dict(config=cfg, qat=bool(getattr(model, "qat", False)), **(extra or {}))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MobileMoE, dict]:
    """Returns (model in eval mode, QAT flag restored; meta dict from config.json). Clear errors on bad input."""
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"{p}: not a model directory (needs config.json and model.safetensors)")
    try:
        meta = json.loads((p / "config.json").read_text())
        cfg = ModelConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p / 'config.json'}: malformed ({e})") from e
    try:
        state = load_file(str(p / "model.safetensors"), device=str(device))
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on corrupt files)
        raise ValueError(f"{p / 'model.safetensors'}: unreadable ({e})") from e
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device=device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    except RuntimeError as e:  # size mismatches raise even with strict=False
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"{p}: weights do not match the config ({first})") from e
    missing = [k for k in missing if not k.endswith("load_accum")]
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for m in model.modules():  # non-persistent buffers are not in the file
        if hasattr(m, "load_accum"):
            m.load_accum.zero_()
    model.set_qat(bool(meta.get("qat", False)))
    model.eval()
    return model, meta


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    t = Path(path) / "tokenizer.json"
    return t if t.is_file() else None
