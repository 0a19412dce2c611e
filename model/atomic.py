"""Crash-safe writes that never delete what this project did not write. No torch here (mobile/ imports it).

Two primitives:
  atomic_file(path, ...)   a temporary file beside `path`, fsynced, then os.replace'd over it
  publish_dir(path, kind=) a temporary folder beside `path`, everything fsynced, then swapped in

A target that already exists is replaced only when nothing of the user's can be lost:
  - it is empty (an empty file, an empty folder), or
  - it is a previous output of the same kind: a file that starts with the format's magic bytes; a folder
    holding the marker file MARKER ({"writer": "mobilemoe", "kind": <kind>}) that publish_dir writes, or one a
    `legacy` predicate recognises (the exact file set written before the marker existed), or
  - the caller passes force=True (the CLIs' --force).
A folder is never replaced by a file nor a file by a folder, force or not: that is always a wrong path.
Refusals raise TargetExistsError (a ValueError, so the CLIs print it as their usual one-line error).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".mobilemoe-export"


class TargetExistsError(ValueError):
    """The output path holds something this writer may not replace."""


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse(path: Path, what: str) -> TargetExistsError:
    return TargetExistsError(f"{path}: {what}; refusing to replace it (pass --force to overwrite)")


def _wrong_type(path: Path, what: str) -> TargetExistsError:
    return TargetExistsError(f"{path}: {what}; refusing to replace it (remove it or choose another path)")


# ---- files ---------------------------------------------------------------------------------------------------
def check_folder(path: str | os.PathLike) -> None:
    """Raise TargetExistsError when `path` (a folder to write into, created if missing) or its nearest existing
    ancestor is not a directory: mkdir would fail there with a bare errno message."""
    p = Path(path)
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise _wrong_type(p, "is a file, not a directory")


def check_file_target(path: str | os.PathLike, *, magic: bytes | None = None,
                      is_ours: Callable[[Path], bool] | None = None, what: str | None = None,
                      force: bool = False) -> None:
    """Raise TargetExistsError unless `path` may be replaced by a new file (see the module docstring).
    `magic`: the leading bytes every output of this writer has. `is_ours`: any other recognition rule.
    Neither: any existing regular file may be replaced (a plain overwrite). `what` names the kind in errors."""
    p = Path(path)
    check_folder(p.parent)
    if p.is_dir():  # follows a symlink: replacing the link would not touch the folder, but the path is wrong
        raise _wrong_type(p, "is a directory, not a file")
    if not os.path.lexists(p) or force:
        return
    if not p.is_file():
        if p.is_symlink():  # dangling: replacing the link deletes nothing
            return
        raise _wrong_type(p, "exists and is not a regular file")
    if magic is None and is_ours is None:
        return
    try:
        if p.stat().st_size == 0:
            return
        if magic is not None:
            with open(p, "rb") as fh:
                if fh.read(len(magic)) == magic:
                    return
        if is_ours is not None and is_ours(p):
            return
    except OSError as e:
        raise _refuse(p, f"exists and cannot be read ({e.strerror})") from e
    raise _refuse(p, f"exists and is not {what or 'an output of this tool'}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, magic: bytes | None = None,
                is_ours: Callable[[Path], bool] | None = None, what: str | None = None,
                force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write by any means (it exists, empty). On a clean
    exit it is fsynced and renamed over `path` and the folder is fsynced; on an exception it is removed and
    `path` is untouched. The target is checked before (fail fast) and again just before the rename."""
    out = Path(path)
    check_file_target(out, magic=magic, is_ours=is_ours, what=what, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_s = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_s)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; an output file is ordinary data
        fsync_path(tmp)
        check_file_target(out, magic=magic, is_ours=is_ours, what=what, force=force)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **check) -> Iterator:
    """atomic_path, with the temporary file opened in `mode` ("wb", "w", "w+b"...)."""
    with atomic_path(path, **check) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str, **check) -> Path:
    with atomic_open(path, "wb", **check) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


# ---- directories ---------------------------------------------------------------------------------------------
def read_marker(path: str | os.PathLike) -> dict | None:
    try:
        m = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("writer") == "mobilemoe" else None


def check_dir_target(path: str | os.PathLike, *, kind: str, legacy: Callable[[Path], bool] | None = None,
                     force: bool = False) -> None:
    """Raise TargetExistsError unless `path` may be replaced by a new folder of `kind`."""
    p = Path(path)
    check_folder(p.parent)
    if not os.path.lexists(p):
        return
    if p.is_symlink():  # swapping would replace the link with a folder and leave its target stale
        raise _wrong_type(p, "is a symbolic link")
    if not p.is_dir():
        raise _wrong_type(p, "is a file, not a directory")
    if force:
        return
    try:
        if not any(p.iterdir()):
            return
    except OSError as e:
        raise _refuse(p, f"cannot be listed ({e.strerror})") from e
    m = read_marker(p)
    if m is not None:
        if m.get("kind") == kind:
            return
        raise _refuse(p, f"holds a different MobileMoE output ({m.get('kind')!r}, not {kind!r})")
    if legacy is not None and legacy(p):
        return
    raise _refuse(p, "is a non-empty directory that is not a previous output of this tool")


def dir_has_only(p: Path, allowed: set[str], required: set[str]) -> bool:
    """For `legacy` predicates: `p` holds regular files only, all in `allowed`, including all of `required`."""
    try:
        entries = list(p.iterdir())
    except OSError:
        return False
    names = {e.name for e in entries}
    return required <= names <= allowed and all(e.is_file() and not e.is_symlink() for e in entries)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE): no instant where `b` is missing.
    False where the platform or file system cannot; the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def publish_dir(path: str | os.PathLike, *, kind: str, legacy: Callable[[Path], bool] | None = None,
                force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to build the output in. On a clean exit the marker is
    added, every file and the folder are fsynced, and it takes `path`'s place (the previous output, if any,
    is removed only after the swap). On an exception it is removed and `path` is untouched."""
    out = Path(path)
    check_dir_target(out, kind=kind, legacy=legacy, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        files = sorted(f.name for f in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps(dict(writer="mobilemoe", kind=kind, files=files)) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        _fsync_tree(tmp)
        check_dir_target(out, kind=kind, legacy=legacy, force=force)
        if os.path.lexists(out) and _exchange(tmp, out):
            pass  # tmp now holds the previous output
        elif os.path.lexists(out):
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))  # unique: tmp's name is
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the build folder on failure, the previous output on success
