"""bench.streaming (expert streaming benchmark): the --quick path end to end on a tiny random export, its resume,
and the report built from a canned raw JSON (the goal's met / missed and an unavailable mmap column)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import streaming_sys
from bench.streaming import _plan_rows
from bench.streaming_report import report_text, write_report
from mobile.engine import DEFAULT_CACHE_POLICY
from tests._mobile_util import ROOT, build_engine


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench.streaming", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_quick_run_measures_every_column_and_resumes(tmp_path):
    build_engine()
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--quick", "--cache-dir", str(cache), "--out", str(out), "--trained", str(tmp_path / "no.mmoe")]
    r = _bench(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    raw = json.loads((out / "streaming_raw.json").read_text())
    rows = raw["rows"]
    res, st, mm = (rows["quick|-|resident|None"], rows[f"quick|40%|stream|{DEFAULT_CACHE_POLICY}"],
                   rows["quick|40%|mmap|None"])
    assert res["evicted_left"] < 0.01 and st["evicted_left"] < 0.01  # cold storage before each run
    # the budget bounds the whole worker's peak RSS, and the expert cache really was smaller than the experts
    assert st["vm_hwm_mb"] <= st["budget_mb"], (st["vm_hwm_mb"], st["budget_mb"])
    c = st["decode"]["cache"]
    assert 4 <= c["slots_per_layer"] < 32 and c["misses"] > 0 and st["decode"]["storage_bytes"] > 0
    assert st["ids"] == res["ids"] and len(res["ids"]) == 16
    for pol in ("lfu", "pin"):
        assert rows[f"quick|40%|stream|{pol}"]["ids"] == res["ids"]
        assert rows[f"quick|40%|stream|{pol}"]["decode"]["cache"]["policy"] == pol
    cap_reason = streaming_sys.MemCgroup.probe()
    if cap_reason is None:  # caps work here: the mmap column must have run inside one
        # the same cap for both; the stream worker's own budget is that sum against its own baseline
        assert "decode" in mm and mm["cap_mb"] == st["cap_mb"] and mm["ids"] == res["ids"]
        assert abs(st["budget_mb"] - st["cap_mb"]) < 1.0 and st["vm_hwm_mb"] <= st["cap_mb"]
        assert mm["cgroup_peak_mb"] <= mm["cap_mb"] + 1e-6
    else:  # never silently uncapped
        assert "decode" not in mm and mm["unavailable"] == cap_reason and cap_reason
    assert "not found" in rows[f"trained|25%|stream|{DEFAULT_CACHE_POLICY}"]["unavailable"]
    md = (out / "streaming.md").read_text()
    for col in ("decode tok/s", "x resident", "decode hit rate", "storage MB / token", "I/O wait s (share)",
                "VmHWM MiB", "cgroup peak MiB", "tokens = resident", "Engine commit", "Engine threads 2",
                "16-token random prompt, then 15 timed decode steps", "Storage (O_DIRECT", "## Cache policies"):
        assert col in md, col
    # the budget column: the MiB the 40% spec became in the worker (its Python baseline differs by machine)
    assert f"| quick | {st['budget_mb']:.0f} | stream |" in md
    assert (out / "streaming.png").stat().st_size > 1000
    r2 = _bench(*args)  # resumes: every row kept, nothing measured again
    assert r2.returncode == 0, r2.stderr
    assert "0 to go" in r2.stdout and json.loads((out / "streaming_raw.json").read_text())["rows"] == rows


def test_bad_matrix_is_one_line_exit_2(tmp_path):
    r = _bench("--matrix", "X@100", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--matrix" in r.stderr, r.stderr
    r = _bench("--matrix", "L@-5", "--out", str(tmp_path))
    assert r.returncode == 2 and "--matrix" in r.stderr, r.stderr


def _row(variant, tok_s, ids, budget=None, **extra):
    d = dict(s=63 / tok_s, tokens=63, storage_bytes=63 * 5_000_000, major_faults=0, cpu_s=1.0, cache={})
    if variant == "stream":
        d["cache"] = dict(hit_rate=0.8, stall_s=1.5, slots_per_layer=21, policy=DEFAULT_CACHE_POLICY)
    return dict(variant=variant, budget_mb=budget, decode=d, prefill=dict(s=2.0, tokens=64), ids=ids, loadavg_end="3.5 2 1",
                vm_hwm_mb=(budget or 3100) - 20, cgroup_peak_mb=budget and budget - 5, **extra)


def _canned(mmap_row) -> dict:
    rows = {"L|-|resident|None": _row("resident", 4.0, [1, 2, 3]),
            f"L|1500|stream|{DEFAULT_CACHE_POLICY}": _row("stream", 2.5, [1, 2, 3], 1500.0),
            "L|1500|mmap|None": mmap_row}
    sig = dict(threads=2, io_threads=2, prompt_tokens=64, decode_tokens=64, trained_decode_tokens=128, seed=0,
               temperature=0.8, top_p=0.95, max_ctx=385, trained_prompt="x")
    return dict(signature=sig, rows=rows, probes={}, storage=dict(direct=True, file="L.mmoe", seq_mb_s=900,
                rand_mb_s=400, rand_iops=400), commit=dict(head="abc", mobile_c_dirty=False),
                machine=dict(cpu="Test CPU", cpus=2), started="2026-01-01 00:00 UTC", duration_s=60)


def test_report_from_canned_raw(tmp_path):
    plan = _plan_rows(dict(matrix=[("L", "1500")], policy_rows=[]))
    md, png = write_report(_canned(_row("mmap", 0.5, [1, 2, 3], 1500.0)), plan, ("L", "1500"), tmp_path)
    text = md.read_text()
    assert "stream / all-resident decode: 0.62x (goal >= 0.5x: met)" in text
    assert "stream / mmap under the same cap: 5.00x (goal >= 3x: met)" in text
    assert "| L | 1500 | stream | 2.50 | 0.62 |" in text and "1.50 (6%)" in text and "| 1480 | 1495 | 21 | yes | 3.5 |" in text
    assert png.stat().st_size > 1000
    text = report_text(_canned(dict(variant="mmap", unavailable="memory cgroup not usable: no root")), plan,
                       ("L", "1500"), "streaming.png")
    assert "| L | 1500 | mmap | unavailable: memory cgroup not usable: no root |" in text
    assert "(goal >= 3x: not measured); mmap unavailable: memory cgroup not usable: no root" in text
    slow = _canned(_row("mmap", 1.0, [1, 2, 4], 1500.0))
    text = report_text(slow, plan, ("L", "1500"), "streaming.png")
    assert "2.50x (goal >= 3x: missed)" in text and "| no |" in text  # tokens differing from resident are shown


def test_mmap_column_without_a_cgroup_says_why(tmp_path):
    """Where no memory cgroup can be made, the mmap row is an explicit 'unavailable', never an uncapped run."""
    from bench.streaming_runs import run_row

    f = tmp_path / "m.mmoe"
    f.write_bytes(b"\0" * 4096)
    row = run_row(f, "mmap", 400.0, None, {}, {}, "memory cgroup not usable: Permission denied")
    assert row["unavailable"] == "memory cgroup not usable: Permission denied" and "decode" not in row
