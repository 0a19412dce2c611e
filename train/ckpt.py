"""Atomic, crash-safe, validated training checkpoints.

    <stage_dir>/ckpt/step_00000120/
        model.safetensors   full (unsharded) model state, fp32
        optim.pt            {"optim": optimizer state (FQN-keyed, full), "rng": RNG states}  (torch.load weights_only)
        state.json          step, data position, schedule step, config fingerprint, losses so far
        tokenizer.json      the run's tokenizer
        COMPLETE            written last

Writing (`save_checkpoint`; one writer per stage directory — rank 0):
  1. every file is written into a hidden temporary folder `.step_N.tmp-*`, each file fsynced, then the folder;
  2. an existing folder of the same step (a re-save) is renamed aside to `.step_N.aside`, never deleted first;
  3. the temporary folder is renamed to `step_N`, the parent fsynced;
  4. the aside folder and pruned old checkpoints are deleted by first renaming them to a hidden `.trash-*` name
     (so a half-deleted folder is never mistaken for a checkpoint), then removing them.
So a kill at any moment leaves, for every step, a complete folder under its final name or its aside name, and
the newest complete checkpoint is never pruned (`keep` >= 1 newest are kept, plus the one just written).

Reading (`list_checkpoints`, `latest_checkpoint`) never changes the directory: it ignores `.tmp-*` and `.trash-*`
folders and folders without COMPLETE, and when `step_N` is missing or incomplete but `.step_N.aside` is complete
(a kill between steps 2 and 3) it returns the aside folder, which loads like any other. The next
`save_checkpoint` repairs the directory before writing: it restores such an aside folder to `step_N`, drops an
aside whose `step_N` is complete, and deletes leftover temporary and trash folders.

`MOBILEMOE_CKPT_FAULT=<point>` (one of FAULT_POINTS) makes `save_checkpoint` SIGKILL its own process at that
point — no Python cleanup runs — so tests can check each crash window (tests/test_ckpt_crash.py).

Loading refuses (one-line ValueError) a folder that is incomplete, unreadable, or was written for a
different model / stage config (fingerprint mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.io import fsync_path

FAULT_ENV = "MOBILEMOE_CKPT_FAULT"
# In the order save_checkpoint reaches them. The two discard points fire at the first folder deleted: the aside
# folder of a same-step re-save, else the first pruned checkpoint.
FAULT_POINTS = (
    "after_model",          # temp folder holds model.safetensors only
    "after_optim",          # ... and optim.pt
    "after_state",          # ... and state.json (+ tokenizer.json)
    "before_fsync",         # every file written, COMPLETE included, nothing fsynced
    "after_fsync",          # files and temp folder fsynced, not yet renamed
    "after_aside",          # re-save: the old same-step folder renamed to .step_N.aside, step_N missing
    "after_rename_in",      # the new folder at step_N, parent not yet fsynced
    "after_parent_fsync",   # the new checkpoint durable, nothing deleted yet
    "discard_renamed",      # a folder being deleted renamed to .trash-*
    "discard_partial",      # ... and its first file removed
    "before_prune",         # aside gone, old checkpoints not yet pruned
)
NEW_VISIBLE_FROM = "after_rename_in"  # from this point on the new checkpoint is the one loaded

_STEP_RE = re.compile(r"^step_(\d+)$")
_ASIDE_RE = re.compile(r"^\.step_(\d+)\.aside$")
_TMP_RE = re.compile(r"^\.step_\d+\.tmp-")
_TRASH_PREFIX = ".trash-"
_CKPT_FILES = ("model.safetensors", "optim.pt", "state.json", "COMPLETE")


class CheckpointError(ValueError):
    pass


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no finally/except, no atexit, no buffered flush
        os._exit(137)  # not reached on POSIX


def _complete(p: Path) -> bool:
    return p.is_dir() and (p / "COMPLETE").is_file()


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


def _discard(path: Path, root: Path) -> None:
    """Delete a folder so that no moment shows it half-deleted under its own name."""
    trash = root / f"{_TRASH_PREFIX}{path.name.lstrip('.')}-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, trash)
    fsync_path(root)
    _fault("discard_renamed")
    files = sorted(trash.iterdir(), key=lambda f: (f.name == "COMPLETE", f.name))  # worst order: data first
    if files and files[0].is_file():
        files[0].unlink()
        _fault("discard_partial")
    shutil.rmtree(trash, ignore_errors=True)


def _repair(root: Path) -> None:
    """Undo what a killed save left behind (writer side only: readers must not race a running save)."""
    changed = False
    for p in sorted(root.iterdir()):
        m = _ASIDE_RE.match(p.name)
        if m is None:
            continue
        final = root / f"step_{int(m.group(1)):08d}"
        if _complete(final) or not _complete(p):
            _discard(p, root)  # the re-save finished (or the aside is junk): the old copy is not needed
        else:
            if final.exists():
                _discard(final, root)
            os.replace(p, final)
            changed = True
    for p in root.iterdir():
        if p.is_dir() and (_TMP_RE.match(p.name) or p.name.startswith(_TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
    if changed:
        fsync_path(root)


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model_state: dict, optim_state: dict,
                    state: dict, tokenizer_json: str | os.PathLike | None, keep: int = 2) -> Path:
    """Write <stage_dir>/ckpt/step_<step> atomically; keep the newest `keep` (>= 1) checkpoints and this one."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the newest checkpoint is never pruned")
    fault = os.environ.get(FAULT_ENV)
    if fault and fault not in FAULT_POINTS:
        raise ValueError(f"{FAULT_ENV}={fault!r} is not a fault point (one of {', '.join(FAULT_POINTS)})")
    root = Path(stage_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    _repair(root)
    final = root / f"step_{step:08d}"
    aside = root / f".step_{step:08d}.aside"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.tmp-", dir=root))
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        _fault("after_model")
        torch.save({"optim": optim_state, "rng": rng_state()}, tmp / "optim.pt")
        _fault("after_optim")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        _fault("after_state")
        (tmp / "COMPLETE").write_text("ok\n")
        _fault("before_fsync")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        _fault("after_fsync")
        if final.exists():
            os.replace(final, aside)
            _fault("after_aside")
        os.replace(tmp, final)
        _fault("after_rename_in")
        fsync_path(root)
        _fault("after_parent_fsync")
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside.exists():
        _discard(aside, root)
    _fault("before_prune")
    for old in list_checkpoints(stage_dir)[:-keep]:
        if old != final:
            _discard(old, root)
    return final


def _step_of(p: Path) -> int:
    m = _STEP_RE.match(p.name) or _ASIDE_RE.match(p.name)
    return int(m.group(1))


def list_checkpoints(stage_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first; a complete `.step_N.aside` stands in for a missing/incomplete step_N."""
    root = Path(stage_dir) / "ckpt"
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        if _STEP_RE.match(p.name) and _complete(p):
            by_step[_step_of(p)] = p
    for p in root.iterdir():
        if _ASIDE_RE.match(p.name) and _complete(p):
            by_step.setdefault(_step_of(p), p)
    return [by_step[s] for s in sorted(by_step)]


def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(stage_dir)
    return cks[-1] if cks else None


def load_checkpoint(path: str | os.PathLike, expect_fingerprint: str | None = None) -> tuple[dict, dict, dict]:
    """-> (model_state, optim_payload {"optim", "rng"}, state dict). Raises CheckpointError with one line."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    for f in _CKPT_FILES:
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
