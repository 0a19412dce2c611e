"""bench.streaming's operating-system side: a child memory cgroup for one worker (page cache charged to it, as
on a phone), evicting a file from the page cache (checked with mincore), and the storage's own O_DIRECT read
bandwidth. Torch-free, Linux only; every probe that cannot work here says why instead of guessing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from pathlib import Path

MiB = 1 << 20
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


# ---- memory cgroups ------------------------------------------------------------------------------------------
def _own_cgroup() -> tuple[str, Path] | tuple[None, str]:
    """("v1" | "v2", the directory of this process's memory cgroup), or (None, why not)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        return None, f"cannot read /proc/self/cgroup ({e.strerror})"
    for ln in lines:
        _, ctrls, rel = ln.split(":", 2)
        if "memory" in ctrls.split(",") and (CGROUP_V1 / "memory.limit_in_bytes").is_file():
            return "v1", CGROUP_V1 / rel.lstrip("/")
    for ln in lines:
        if ln.startswith("0::") and (CGROUP_V2 / "cgroup.controllers").is_file():
            d = CGROUP_V2 / ln[3:].lstrip("/")
            ctrl = (d / "cgroup.subtree_control")
            if "memory" not in (ctrl.read_text() if ctrl.is_file() else ""):
                return None, f"cgroup v2: the memory controller is not enabled for children of {d}"
            return "v2", d
    return None, "no memory cgroup controller mounted (neither /sys/fs/cgroup/memory nor cgroup v2)"


class MemCgroup:
    """A fresh child memory cgroup limited to limit_mb (anonymous memory and page cache alike; swap is not
    counted, and the runs here have none to use). `preexec` moves the forked worker into it before exec, so the
    limit and the peak apply to that worker alone. Use MemCgroup.probe() first to learn whether it can work."""

    def __init__(self, name: str, limit_mb: float):
        kind, base = _own_cgroup()
        if kind is None:
            raise OSError(base)
        self.kind, self.dir = kind, Path(base) / name
        if self.dir.exists():  # left by a killed run: it has no tasks any more, so it can go
            self.dir.rmdir()
        self.dir.mkdir()
        limit = str(int(limit_mb * MiB))
        if kind == "v1":
            (self.dir / "memory.limit_in_bytes").write_text(limit)
        else:
            (self.dir / "memory.max").write_text(limit)
            if (self.dir / "memory.swap.max").exists():
                (self.dir / "memory.swap.max").write_text("0")

    def preexec(self) -> None:
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        f = self.dir / ("memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak")
        try:
            return int(f.read_text()) / MiB
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        f = self.dir / ("memory.oom_control" if self.kind == "v1" else "memory.events")
        try:
            for ln in f.read_text().splitlines():
                if ln.startswith("oom_kill "):
                    return int(ln.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def remove(self) -> None:
        for _ in range(50):  # the dead worker's charge drains asynchronously
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.05)

    @staticmethod
    def probe() -> str | None:
        """None if a child cgroup with a memory limit can be made here, else the reason it cannot."""
        try:
            cg = MemCgroup(f"mmoe-probe-{os.getpid()}", 64)
        except OSError as e:
            return f"memory cgroup not usable: {e}"
        cg.remove()
        return None


# ---- page cache ----------------------------------------------------------------------------------------------
_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype, _libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                    ctypes.c_int, ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return _libc


def cached_fraction(path: str | os.PathLike) -> float:
    """The fraction of the file's pages in the page cache now (mincore on a read-only shared mapping, which
    itself touches no page)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    lib, page = _lib(), os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            n = (size + page - 1) // page
            vec = ctypes.create_string_buffer(n)
            if lib.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in vec.raw) / n
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)


def evict(path: str | os.PathLike) -> float:
    """Drop the file from the page cache (fsync, then POSIX_FADV_DONTNEED over the whole file); returns the
    fraction still cached afterwards (mincore), which the rows record: pages mapped by a live process stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return cached_fraction(path)


def warm(path: str | os.PathLike, chunk: int = 8 * MiB) -> float:
    """Read the whole file once (into the page cache); returns the seconds it took."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


# ---- storage bandwidth ---------------------------------------------------------------------------------------
def storage_bandwidth(path: str | os.PathLike, seq_mib: int = 1024, rand_reads: int = 256, seed: int = 0) -> dict:
    """O_DIRECT reads of `path` (page cache bypassed): sequential 4 MiB reads over its first seq_mib MiB, and
    rand_reads 1 MiB reads at random 1 MiB-aligned offsets. MB/s are 1e6 bytes a second. Falls back to buffered
    reads after eviction where the filesystem refuses O_DIRECT (direct=False in the result)."""
    size = os.path.getsize(path)
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        direct, fd = False, os.open(path, os.O_RDONLY)
    out = dict(file=str(path), file_mb=size / 1e6, direct=direct)
    try:
        big = mmap.mmap(-1, 4 * MiB)  # page-aligned, as O_DIRECT needs
        view = memoryview(big)
        if not direct:
            evict(path)
        t = time.perf_counter()
        got = sum(os.preadv(fd, [view], o) for o in range(0, min(size, seq_mib * MiB), 4 * MiB))
        dt = time.perf_counter() - t
        out.update(seq_mb=got / 1e6, seq_s=dt, seq_mb_s=got / 1e6 / dt if dt > 0 else float("nan"))
        if not direct:
            evict(path)
        blocks = max(1, size // MiB)
        offs = [random.Random(seed).randrange(blocks) * MiB for _ in range(rand_reads)]
        small = view[:MiB]
        t = time.perf_counter()
        got = sum(os.preadv(fd, [small], o) for o in offs)
        dt = time.perf_counter() - t
        out.update(rand_reads=rand_reads, rand_mb=got / 1e6, rand_s=dt,
                   rand_mb_s=got / 1e6 / dt if dt > 0 else float("nan"), rand_iops=rand_reads / dt if dt else 0)
        small.release()
        view.release()
        big.close()
    finally:
        os.close(fd)
    return out
