"""Share one resumable list of runs between worker processes: each run is taken under its own lock file, so
N processes started on the same folder split the list (one core each) instead of refusing each other.

A run is taken only when it is not done, its prerequisites are done, and no other process holds its lock; the
done check is repeated once the lock is held, because another worker may have finished the run in between.
When a run left waits on a prerequisite another worker holds, this worker polls until it can go on; when every
run left is held by another worker, it stops (they finish them)."""
from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

R = TypeVar("R")


def take_runs(runs: list[R], lock_dir: Path, key: Callable[[R], str], is_done: Callable[[R], bool],
              needs: Callable[[R], list[str]] = lambda r: [], poll_s: float = 20.0, log=print) -> Iterator[R]:
    """Yield the runs this process should train, in list order, each while its lock is held (the lock is
    released when the caller asks for the next one). `needs(run)`: keys of runs that must be done first;
    a prerequisite outside `runs` that is not done is an error for the caller's execute to name, so it does
    not block here."""
    from train.store import try_lock  # noqa: PLC0415

    lock_dir.mkdir(parents=True, exist_ok=True)
    by_key = {key(r): r for r in runs}
    pending = [r for r in runs if not is_done(r)]
    waiting_said = False
    while pending:
        took, waits = None, False
        for run in pending:
            if is_done(run):
                took = run  # finished by another worker: drop it
                break
            if any(k in by_key and not is_done(by_key[k]) for k in needs(run)):
                waits = True
                continue
            lock = try_lock(lock_dir / f"{key(run)}.lock")
            if lock is None:
                continue
            try:
                if not is_done(run):
                    waiting_said = False
                    yield run
            finally:
                lock.close()
            took = run
            break
        if took is not None:
            pending.remove(took)
            continue
        if not waits:
            log(f"worklist: the {len(pending)} run(s) left are held by other workers; this one stops")
            return
        if not waiting_said:
            log(f"worklist: {len(pending)} run(s) left, held by other workers or waiting on a run that is; "
                f"polling every {poll_s:g} s")
            waiting_said = True
        time.sleep(poll_s)


@contextmanager
def held(path: Path):
    """An exclusive flock on `path` for a short critical section (blocks until the holder lets go)."""
    with open(path, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
