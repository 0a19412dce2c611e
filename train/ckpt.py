"""Atomic, crash-safe, validated training checkpoints, in two layouts.

Sharded layout (what training writes, at every world size — one process included: `save_sharded_checkpoint`,
torch.distributed.checkpoint underneath):

    <stage_dir>/ckpt/step_00000120/
        .metadata           DCP's index: every tensor's global shape and which file holds which piece
        __<rank>_0.distcp   each rank's own shards of the model and AdamW state (FQN-keyed), fp32
        rng_rank<RRRRR>.pt  each rank's RNG states (torch.load weights_only)
        state.json          step, data position, schedule step, config fingerprint, format "dcp", world size
        tokenizer.json      the run's tokenizer
        COMPLETE            written last

No rank ever holds the full model or optimizer state to save it: each writes the shards it owns (under FSDP2
the DTensor shards; in one process, the whole tensors, which it holds anyway). The LR schedule is a pure
function of the step and the data stream of (seed, step) (train/loop.py), so the step restores both.
`restore_checkpoint` loads such a folder at any world size (2 ranks -> 1, 1 -> 2, ...: each rank reads the
pieces its own shards cover); a rank the saving run did not have continues rank 0's RNG stream.

Full layout (written before the sharded one existed; still restored, and still written by `save_checkpoint`
for callers holding a full state):

    <stage_dir>/ckpt/step_00000120/
        model.safetensors   full (unsharded) model state, fp32
        optim.pt            {"optim": optimizer state (FQN-keyed, full), "rng": RNG states}  (torch.load weights_only)
        state.json, tokenizer.json, COMPLETE   as above

`restore_checkpoint` (training's resume; collective) reads either layout; `load_checkpoint` reads either one
whole into one process (tools, tests; a sharded one is assembled from all its shards).

Writing (one writer of the folder per stage directory — rank 0; in the sharded layout every rank writes its
own files into rank 0's temporary folder, so all ranks must share the filesystem):
  1. every file is written into a hidden temporary folder `.step_N.tmp-*`, each file fsynced, then the folder
     (sharded: all ranks write and fsync their files, then report to rank 0 — the barrier — and only when every
     rank succeeded does rank 0 write state.json + COMPLETE and go on; a failure on any rank raises
     CheckpointError on every rank and the temporary folder is removed);
  2. an existing folder of the same step (a re-save) is renamed aside to `.step_N.aside`, never deleted first;
  3. the temporary folder is renamed to `step_N`, the parent fsynced;
  4. the aside folder and pruned old checkpoints are deleted by first renaming them to a hidden `.trash-*` name
     (so a half-deleted folder is never mistaken for a checkpoint), then removing them.
So a kill at any moment leaves, for every step, a complete folder under its final name or its aside name, and
the newest complete checkpoint is never pruned (`keep` >= 1 newest are kept, plus the one just written).

Reading (`list_checkpoints`, `latest_checkpoint`, `restore_checkpoint`, `load_checkpoint`) never changes the
directory: it ignores `.tmp-*` and `.trash-*` folders and folders without COMPLETE, and when `step_N` is
missing or incomplete but `.step_N.aside` is complete (a kill between steps 2 and 3) it returns the aside
folder, which loads like any other. The next save repairs the directory before writing: it restores such an
aside folder to `step_N`, drops an aside whose `step_N` is complete, and deletes leftover temporary and trash
folders.

`MOBILEMOE_CKPT_FAULT=<point>` (one of FAULT_POINTS) makes a save SIGKILL its own process at that point — no
Python cleanup runs — so tests can check each crash window (tests/test_ckpt_crash.py for the full layout,
tests/test_ckpt_dcp.py for the sharded one). In a multi-rank save the points up to after_optim fire on every
rank that has the variable set, the later ones on rank 0 only (the other ranks then fail by the collective
timeout, as they would if rank 0's node died).

Loading refuses (one-line CheckpointError, a ValueError) a folder that is incomplete, unreadable, or was
written for a different model / stage config (fingerprint mismatch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.io import fsync_path

FAULT_ENV = "MOBILEMOE_CKPT_FAULT"
# In the order save_checkpoint reaches them. The two discard points fire at the first folder deleted: the aside
# folder of a same-step re-save, else the first pruned checkpoint.
FAULT_POINTS = (
    "after_model",          # temp folder holds model.safetensors only (sharded: all shards, model + optimizer)
    "after_optim",          # ... and optim.pt (sharded: the same moment as after_model)
    "after_state",          # ... and state.json (+ tokenizer.json; sharded: + every rank's RNG file)
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
_CKPT_FILES = ("model.safetensors", "optim.pt", "state.json", "COMPLETE")  # the full layout
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files
_DCP_FILES = (DCP_METADATA, "rng_rank00000.pt", "state.json", "COMPLETE")  # the sharded layout


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


def _check_args(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the newest checkpoint is never pruned")
    fault = os.environ.get(FAULT_ENV)
    if fault and fault not in FAULT_POINTS:
        raise ValueError(f"{FAULT_ENV}={fault!r} is not a fault point (one of {', '.join(FAULT_POINTS)})")


def _begin(stage_dir, step: int) -> tuple[Path, Path, Path, Path]:
    """Repair the directory, make the temporary folder. -> (root, final, aside, tmp)."""
    root = Path(stage_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    _repair(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.tmp-", dir=root))
    return root, root / f"step_{step:08d}", root / f".step_{step:08d}.aside", tmp


def _commit(stage_dir, root: Path, tmp: Path, final: Path, aside: Path, keep: int) -> Path:
    """COMPLETE, fsync, rename in (the old same-step folder aside), discard the aside, prune. Owns `tmp`."""
    try:
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


def save_checkpoint(stage_dir: str | os.PathLike, step: int, model_state: dict, optim_state: dict,
                    state: dict, tokenizer_json: str | os.PathLike | None, keep: int = 2) -> Path:
    """Write a full-state <stage_dir>/ckpt/step_<step> atomically; keep the newest `keep` (>= 1) checkpoints
    and this one. One process writes (the full state must already be on it)."""
    _check_args(keep)
    root, final, aside, tmp = _begin(stage_dir, step)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(stage_dir, root, tmp, final, aside, keep)


# ------------------------------------------------------------------------------------------------------
# sharded (DCP) checkpoints
def _dist() -> tuple[int, int]:
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _one_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        r, f = next(iter(sorted(failures.items())))
        return f"rank {r}: {_one_line(f[0] if isinstance(f, tuple) else f)}"
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _agree(mine, rank0_only: bool = False) -> list:
    """All ranks' `mine` (an error string or None) on every rank; rank0_only: just rank 0's, broadcast.
    Doubles as the barrier between the phases of a sharded save, and turns one rank's failure into the same
    exception on every rank instead of a collective hang."""
    import torch.distributed as dist  # noqa: PLC0415

    rank, world = _dist()
    if world == 1:
        return [mine]
    if rank0_only:
        box = [mine]
        dist.broadcast_object_list(box, src=0)
        return box
    out = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _raise_first(errs: list, what: str) -> None:
    for r, e in enumerate(errs):
        if e is not None:
            raise CheckpointError(f"{what} failed on rank {r}: {e}")


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns at every call without a process group, though one process is this module's intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*(disabled|unavailable)", category=UserWarning)
        yield


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def save_sharded_checkpoint(stage_dir: str | os.PathLike, step: int, model, optim, state: dict,
                            tokenizer_json: str | os.PathLike | None, keep: int = 2) -> Path:
    """Collective (every rank calls it; also fine without a process group): write <stage_dir>/ckpt/step_<step>
    in the sharded layout. Each rank writes its own shards of model + optimizer (never the full state) and its
    RNG state into rank 0's temporary folder; after all ranks report success rank 0 adds state.json,
    tokenizer.json and COMPLETE and publishes the folder exactly as save_checkpoint does. Returns the path on
    every rank; a failure on any rank raises CheckpointError on every rank and leaves the previous
    checkpoints as they were."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415  (imported on use: it costs seconds)
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

    _check_args(keep)
    rank, world = _dist()
    began, err = None, None
    if rank == 0:
        try:
            began = _begin(stage_dir, step)
        except Exception as e:  # noqa: BLE001  (reported on every rank below)
            err = _one_line(e)
    _raise_first(_agree(err, rank0_only=True), "preparing the checkpoint folder")
    tmp_name = _agree(str(began[3]) if rank == 0 else None, rank0_only=True)[0]
    tmp = Path(tmp_name)
    try:
        msd, osd = get_state_dict(model, optim)  # this rank's shards (DTensors under FSDP2), no gather
        try:
            # collective; a failure on one rank raises on all. sync_files: every shard file and .metadata
            # are fsynced by the rank that wrote them.
            with _single_process_quiet():
                dcp.save({"model": msd, "optim": osd}, no_dist=world == 1,
                         storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (CheckpointException is a BaseException)
            raise CheckpointError(f"writing the sharded state of step {step} failed: {_one_line(e)}") from e
        del msd, osd
        _fault("after_model")  # model and optimizer shards are written together
        _fault("after_optim")
        err = None
        try:
            torch.save(rng_state(), tmp / _rng_file(rank))
            fsync_path(tmp / _rng_file(rank))
        except Exception as e:  # noqa: BLE001
            err = _one_line(e)
        _raise_first(_agree(err), "writing the RNG state")  # every rank's files are on disk from here
        if rank == 0:
            try:
                (tmp / "state.json").write_text(json.dumps(dict(state, step=step, format="dcp", world_size=world),
                                                           indent=1))
                if tokenizer_json is not None:
                    shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
                _fault("after_state")
                root, final, aside, _ = began
                _commit(stage_dir, root, tmp, final, aside, keep)
            except Exception as e:  # noqa: BLE001  (reported on every rank below)
                err = _one_line(e)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0 and err is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # _commit restored any aside folder; the old checkpoints stand
    _raise_first(_agree(err, rank0_only=True), f"saving checkpoint step {step}")
    return Path(stage_dir) / "ckpt" / f"step_{step:08d}"


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


ABANDONED_DIR = "abandoned"


def set_aside_after(stage_dir: str | os.PathLike, step: int) -> list[Path]:
    """A stage resumed from an explicit earlier checkpoint takes another trajectory from `step` on, so the
    stage's checkpoints after `step` belong to the abandoned one. Left in place they would be the latest after
    the next kill (an automatic resume would silently continue the abandoned run), and pruning would remove the
    new run's checkpoints before them. They are moved whole into <stage_dir>/ckpt/abandoned/<time>-<pid>/
    (moved, never deleted: they are the user's), where list_checkpoints does not look. Collective: rank 0
    moves, every rank gets the same result or the same error. -> the new paths."""
    rank, _ = _dist()
    moved: list[Path] = []
    err = None
    if rank == 0:
        try:
            root = Path(stage_dir) / "ckpt"
            later = [p for p in list_checkpoints(stage_dir) if _step_of(p) > step]
            if later:
                dest = root / ABANDONED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                dest.mkdir(parents=True)
                for p in later:
                    moved.append(dest / f"step_{_step_of(p):08d}")
                    os.replace(p, moved[-1])
                fsync_path(dest)
                fsync_path(root)
        except OSError as e:
            err = _one_line(e)
    _raise_first(_agree(err), "setting aside the abandoned run's later checkpoints")
    return moved


def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(stage_dir)
    return cks[-1] if cks else None


def load_checkpoint(path: str | os.PathLike, expect_fingerprint: str | None = None) -> tuple[dict, dict, dict]:
    """Read a checkpoint of either layout whole into this process -> (model_state, optim_payload {"optim",
    "rng"}, state dict); a sharded one is assembled from all its shards (rank 0's RNG state). For tools, tests
    and full-layout resumes; training resumes through restore_checkpoint, which never assembles the full
    state. Raises CheckpointError with one line."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    missing = missing_file(p)
    if missing is not None:
        raise CheckpointError(f"checkpoint {p} is incomplete (no {missing})")
    state = _read_state(p, expect_fingerprint)
    if is_sharded(p):
        from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: PLC0415

        try:
            with tempfile.TemporaryDirectory() as td, _single_process_quiet():  # readers never write into p
                dcp_to_torch_save(p, Path(td) / "full.pt")
                full = torch.load(Path(td) / "full.pt", map_location="cpu", weights_only=True)
            rng = torch.load(p / _rng_file(0), map_location="cpu", weights_only=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {p}: unreadable sharded state ({_one_line(e)})") from e
        return full["model"], {"optim": full["optim"], "rng": rng}, state
    try:
        model_state = load_file(str(p / "model.safetensors"))
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on corrupt files)
        raise CheckpointError(f"checkpoint {p}: corrupt model.safetensors ({e})") from e
    try:
        payload = torch.load(p / "optim.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p}: corrupt optim.pt ({e})") from e
    return model_state, payload, state


def is_sharded(path: str | os.PathLike) -> bool:
    """True for the sharded (DCP) layout: its .metadata, or a state.json that says so."""
    p = Path(path)
    if (p / DCP_METADATA).is_file():
        return True
    try:
        return json.loads((p / "state.json").read_text()).get("format") == "dcp"
    except (OSError, ValueError, AttributeError):
        return False


def missing_file(path: str | os.PathLike) -> str | None:
    """The first file a complete checkpoint folder of its layout needs and `path` lacks, else None."""
    p = Path(path)
    if is_sharded(p):
        files = _DCP_FILES
    elif not (p / "model.safetensors").is_file():
        return f"model.safetensors (full layout) or {DCP_METADATA} (sharded layout)"
    else:
        files = _CKPT_FILES
    return next((f for f in files if not (p / f).is_file()), None)


def _read_state(p: Path, expect_fingerprint: str | None) -> dict:
    try:
        state = json.loads((p / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {p}: corrupt state.json ({e})") from e
    if expect_fingerprint is not None and state.get("fingerprint") != expect_fingerprint:
        raise CheckpointError(f"checkpoint {p} was written for a different model/stage config "
                              f"(fingerprint {state.get('fingerprint')} != {expect_fingerprint})")
    return state


def restore_checkpoint(path: str | os.PathLike, model, optim, expect_fingerprint: str | None = None) -> dict:
    """Collective: load a checkpoint of either layout into `model` (plain or FSDP2-sharded) and `optim`, set
    this rank's RNG state, and return state.json's dict. The world size may differ from the one that saved it:
    each rank reads only the pieces of the sharded files that its own shards cover. A full-layout folder is
    read whole on every rank (its state fitted one process when it was written). Never writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: PLC0415

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    missing = missing_file(p)
    if missing is not None:
        raise CheckpointError(f"checkpoint {p} is incomplete (no {missing})")
    if not is_sharded(p):  # the full layout (checkpoints written before the sharded one existed)
        model_state, payload, state = load_checkpoint(p, expect_fingerprint)
        set_state_dict(model, optim, model_state_dict=model_state, optim_state_dict=payload["optim"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        set_rng_state(payload["rng"])
        return state
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    state = _read_state(p, expect_fingerprint)
    rank, world = _dist()
    msd, osd = get_state_dict(model, optim)  # this rank's shards: the targets dcp.load fills in place
    sd = {"model": msd, "optim": osd}
    try:
        with _single_process_quiet():
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(p)), no_dist=world == 1)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (DCP's is a BaseException)
        raise CheckpointError(f"checkpoint {p}: unreadable sharded state ({_one_line(e)})") from e
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    # a rank the saving run did not have (the world grew) continues rank 0's stream, as the full layout does
    rng = p / _rng_file(rank)
    rng = rng if rng.is_file() else p / _rng_file(0)
    try:
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p}: corrupt {rng.name} ({_one_line(e)})") from e
    return state
