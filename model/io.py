"""A model directory: the hand-off format between train/, mobile/ export, bench/ eval and model/hf.py.

    <dir>/config.json         ModelConfig.to_dict() (+ "qat": bool, whether the weights were QAT-trained)
    <dir>/model.safetensors   the MobileMoE state_dict, fp32 (buffers such as expert_bias included)
    <dir>/tokenizer.json      optional: a `tokenizers` tokenizer (byte-level BPE); absent = raw bytes

Writes are atomic: everything goes to a temporary sibling folder that is swapped into place (model/atomic.py);
the folder also holds model/atomic.py's marker, so a later save recognises it as its own and replaces it, while a
non-empty folder of anything else is refused (TargetExistsError) unless force=True.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# fsync_path lives in model/atomic.py now; re-exported for existing `from model.io import fsync_path`
from model.atomic import check_dir_target, dir_has_only, fsync_path, publish_dir  # noqa: F401
from model.config import ModelConfig
from model.model import MobileMoE

MODEL_DIR_KIND = "model-dir"
MODEL_DIR_FILES = {"config.json", "model.safetensors", "tokenizer.json"}


def _legacy_model_dir(p: Path) -> bool:
    """A model directory written before the marker existed: exactly our files (plus the model.mmoe that
    bench/lm_eval_adapter.py exports beside the weights), and a config.json of ours."""
    if not dir_has_only(p, MODEL_DIR_FILES | {"model.mmoe"}, {"config.json", "model.safetensors"}):
        return False
    try:
        return isinstance(json.loads((p / "config.json").read_text()).get("config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_model_dir_target(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Raise TargetExistsError unless save_model_dir may write `out_dir` (CLIs call it before the slow part)."""
    check_dir_target(out_dir, kind=MODEL_DIR_KIND, legacy=_legacy_model_dir, force=force)


def save_model_dir(model: MobileMoE, out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None,
                   extra: dict | None = None, force: bool = False) -> Path:
    """Atomically (re)write a model directory. An existing `out_dir` is replaced only when it is empty or a
    previous model directory (model/atomic.py's rules) unless force=True; else TargetExistsError."""
    out = Path(out_dir)
    cfg = model.cfg.to_dict()
    meta = dict(config=cfg, qat=bool(getattr(model, "qat", False)), **(extra or {}))
    with publish_dir(out, kind=MODEL_DIR_KIND, legacy=_legacy_model_dir, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
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
