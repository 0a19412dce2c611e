"""bench.streaming's measuring side: the model files (cached random exports), turning a budget spec into MiB,
and one row = one worker process (bench/streaming_worker.py) started in its own memory cgroup from cold storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import mobile_driver, streaming_sys
from bench.machine import REPO, loadavg
from model import cli

MiB = 1 << 20
# The --quick model: 4 layers x 32 experts of 128 x 256 (7.8 MB, 54 KiB records), so a few MB of budget decide
# the slot count and every phase takes well under a second.
QUICK_SHAPE = dict(d_model=256, n_heads=4, n_kv_heads=2, n_experts=32, top_k=4, expert_ffn_dim=128)
QUICK_FORMAT = 1  # bump when QUICK_SHAPE or its init changes


def prepare(names: list[str], cache: Path, seed: int, trained: Path, log) -> dict[str, Path | str]:
    """{name: model path, or the reason it is unavailable}: S / M / L random exports (bench.mobile's stamped
    cache, reused), "quick" (QUICK_SHAPE), "trained" (the given trained model, never made here)."""
    out: dict[str, Path | str] = {}
    sizes = [n for n in names if n in ("S", "M", "L")]
    if sizes:
        for s, paths in mobile_driver.prepare_models(sizes, cache, seed, log, gguf=False).items():
            out[s] = paths["ours"]
    if "quick" in names:
        from mobile.export import export_random  # noqa: PLC0415  (numpy only)

        path, stamp = cache / "quick-random.mmoe", cache / "quick.stamp.json"
        want = dict(shape=QUICK_SHAPE, seed=seed, format=QUICK_FORMAT)
        if not (path.is_file() and mobile_driver._read_stamp(stamp) == want):
            export_random("tiny", path, seed=seed, force=True, **QUICK_SHAPE)
            stamp.write_text(json.dumps(want))
        out["quick"] = path
    if "trained" in names:
        out["trained"] = trained if trained.is_file() else f"{trained} not found (make train writes runs/tiny/model.mmoe)"
    return out


def parse_spec(spec: str, opt: str, known: tuple[str, ...]) -> list[tuple[str, str]]:
    """'S@400,L@1500,trained@25%' -> [(model, budget)]: a budget in MiB, or N% of a layer's experts as slots."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, b = part.partition("@")
        if not sep or name not in known:
            raise cli.BadInput(f"{opt}: expected MODEL@MIB or MODEL@N% with MODEL one of {cli.choices(known)}, "
                               f"got {part!r}")
        try:
            v = float(b[:-1] if b.endswith("%") else b)
        except ValueError:
            raise cli.BadInput(f"{opt}: {part!r}: the budget must be a number of MiB or a percentage") from None
        if not (v > 0 and (v <= 100 or not b.endswith("%")) and np.isfinite(v)):
            raise cli.BadInput(f"{opt}: {part!r}: the budget must be > 0 (and a percentage <= 100)")
        out.append((name, b))
    if not out:
        raise cli.BadInput(f"{opt}: empty")
    return out


def slots(spec: str, probe: dict) -> int | None:
    """The slot count a layer an N% spec asks for (at least top_k); None for a MiB spec."""
    if not spec.endswith("%"):
        return None
    return int(np.clip(round(float(spec[:-1]) / 100 * probe["n_experts"]), probe["top_k"], probe["n_experts"]))


def budget_mb(spec: str, probe: dict) -> float:
    """MiB for a spec: as given, or for N% the probed minimum (top_k slots) + the further slots + half a slot a
    layer, so rounding keeps the count. (The worker redoes the N% sum against its own baseline; this figure is
    the cgroup cap and the report's before the run.)"""
    k = slots(spec, probe)
    if k is None:
        return float(spec)
    per_slot = probe["slot_bytes"] * probe["moe_layers"] / MiB
    return probe["min_budget_mb"] + (k - probe["top_k"] + 0.5) * per_slot


def _worker(plan: dict, timeout: float, cgroup=None) -> tuple[dict | None, str | None]:
    """(the worker's JSON, None) or (None, why it failed)."""
    cmd = [sys.executable, "-m", "bench.streaming_worker", "--plan", json.dumps(plan)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                           preexec_fn=cgroup.preexec if cgroup else None)
    except subprocess.TimeoutExpired:
        return None, f"timeout: not finished after {timeout:.0f} s"
    if p.returncode != 0:
        if cgroup is not None and (cgroup.oom_kills() or 0) > 0:
            return None, f"OOM-killed under the {plan.get('cap_mb', 0):.0f} MiB cap"
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"rc {p.returncode}"]
        return None, f"worker failed (rc {p.returncode}): {tail[0]}"
    return json.loads(p.stdout.strip().splitlines()[-1]), None


def probe(path: Path, o: dict) -> dict:
    res, err = _worker(dict(model=str(path), mode="probe", threads=o["threads"], io_threads=o["io_threads"],
                            max_ctx=o["max_ctx"]), o["timeout"])
    if err:
        raise RuntimeError(f"probe of {path}: {err}")
    return res


def run_row(path: Path, variant: str, budget: float | None, policy: str | None, prompt: dict, o: dict,
            cap_reason: str | None, slot_plan: dict | None = None) -> dict:
    """One measured row. variant: resident (uncapped), stream (the budget, and the same cgroup cap when caps
    work), mmap (the normal open under a cgroup cap of the budget; without caps: unavailable, never uncapped)."""
    row: dict = dict(variant=variant, budget_mb=budget, policy=policy, model_file=str(path), loadavg_start=loadavg())
    capped = variant in ("stream", "mmap") and cap_reason is None
    if variant == "mmap" and cap_reason is not None:
        row["unavailable"] = cap_reason
        return row
    row["cap_mb"] = budget if capped else None
    row["evicted_left"] = streaming_sys.evict(path)  # cold storage: the run pays for every byte it reads
    plan = dict(model=str(path), mode=variant, threads=o["threads"], io_threads=o["io_threads"],
                max_ctx=o["max_ctx"], decode_tokens=prompt["decode_tokens"], budget_mb=budget, policy=policy,
                cap_mb=budget, **(slot_plan or {}), **{k: v for k, v in prompt.items() if k != "decode_tokens"})
    cg = None
    try:
        if capped:
            cg = streaming_sys.MemCgroup(f"mmoe-stream-{variant}-{os.getpid()}", budget)
        t = time.time()
        res, err = _worker(plan, o["timeout"], cg)
        row["wall_s"] = time.time() - t
        if cg is not None:
            row["cgroup_peak_mb"], row["oom_kills"] = cg.peak_mb(), cg.oom_kills()
    finally:
        if cg is not None:
            cg.remove()
    if err:
        row["failed"] = err
    else:
        row.update(res)
    row["loadavg_end"] = loadavg()
    return row
