"""One bench.streaming measurement in a fresh process (so a memory cgroup and VmHWM apply to it alone); prints
one JSON line. Started by bench/streaming.py, which puts it in its cgroup and evicts the model file first.

    python -m bench.streaming_worker --plan '{"model": "S.mmoe", "mode": "stream", "budget_mb": 400, ...}'

mode: "resident" (the file read into the page cache, then the normal mmap open: everything in memory),
"mmap" (the normal open from cold storage; under the driver's cgroup cap the kernel pages the file in and out),
"stream" (Engine(mem_budget_mb=): experts read into the expert cache), "probe" (the streaming figures the driver
needs to turn a slot count into a budget: min_budget_mb, slot_bytes, moe_layers, top_k, n_experts).

Timed: prefill of the prompt (one eval), then decode_tokens - 1 single-token evals. Each step's token is
sampled (temperature, top_p, a fixed seed: the same tokens whatever the column, as the logits are bit-identical)
and recorded in "ids"; the token fed back is that sample, or decode_ids[i] when the plan gives them (random
models: their samples loop on one or two tokens, which would flatter the expert cache). Per phase:
seconds, the engine's cache stats (stream), this process's storage reads (/proc/self/io read_bytes: O_DIRECT
reads and page faults alike), major page faults and CPU seconds (all threads).
"""

from __future__ import annotations

import ctypes
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from bench import streaming_sys
from mobile.engine import Engine
from model import cli


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _counters() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return dict(t=time.perf_counter(), io=_io_read_bytes(), majflt=ru.ru_majflt, cpu=ru.ru_utime + ru.ru_stime)


def _delta(a: dict, b: dict) -> dict:
    return dict(s=b["t"] - a["t"], storage_bytes=b["io"] - a["io"], major_faults=b["majflt"] - a["majflt"],
                cpu_s=b["cpu"] - a["cpu"])


def probe(plan: dict) -> dict:
    streaming_sys.cached_fraction(plan["model"])  # what measure() does before its open, so the baselines match
    rss = _status_mb("VmRSS")
    with Engine(plan["model"], threads=plan["threads"], max_ctx=plan["max_ctx"], mem_budget_mb=1 << 20,
                io_threads=plan["io_threads"]) as eng:
        cs = eng.cache_stats()
        return dict(mode="probe", min_budget_mb=cs["min_budget_mb"], slot_bytes=cs["slot_bytes"],
                    moe_layers=cs["moe_layers"], n_experts=eng.n_experts, top_k=eng.info("top_k"),
                    resident_mb=cs["resident_mb"], vocab_size=eng.vocab_size, rss_before_open_mb=rss)


def measure(plan: dict) -> dict:
    mode, path = plan["mode"], plan["model"]
    out: dict = dict(mode=mode, cached_at_start=streaming_sys.cached_fraction(path))
    if mode == "resident":
        out["warm_s"] = streaming_sys.warm(path)
    budget = plan.get("budget_mb")
    if mode == "stream" and plan.get("slots"):
        # N slots a layer: the probe's minimum moved by this process's own baseline (the engine counts the RSS
        # at open, which differs between processes by more than a small model's slot), + half a slot of slack
        pr, k = plan["probe"], plan["slots"]
        budget = (pr["min_budget_mb"] - pr["rss_before_open_mb"] + _status_mb("VmRSS")
                  + (k - pr["top_k"] + 0.5) * pr["slot_bytes"] * pr["moe_layers"] / (1 << 20))
    out["budget_mb"] = budget
    kw = dict(mem_budget_mb=budget, cache_policy=plan["policy"], io_threads=plan["io_threads"]) \
        if mode == "stream" else {}
    c0 = _counters()
    eng = Engine(path, threads=plan["threads"], max_ctx=plan["max_ctx"], **kw)
    out["open"] = _delta(c0, _counters())
    out["kernels"] = eng.kernels
    prompt = plan["prompt_ids"] if "prompt_ids" in plan else eng.tokenize(plan["prompt_text"])
    rng = ctypes.c_uint64(eng.lib.mmoe_rng_seed(plan["sample_seed"]))
    temp, top_p = plan["temperature"], plan["top_p"]
    eng.cache_stats_reset()
    c0 = _counters()
    logits = eng.eval(prompt)
    c1 = _counters()
    out["prefill"] = dict(_delta(c0, c1), tokens=len(prompt), cache=eng.cache_stats())
    eng.cache_stats_reset()
    ids = [eng.sample(logits, temp, top_p, rng)]
    c0 = _counters()
    forced = plan.get("decode_ids")
    for i in range(plan["decode_tokens"] - 1):
        logits = eng.eval([forced[i] if forced else ids[-1]])
        ids.append(eng.sample(logits, temp, top_p, rng))
    c1 = _counters()
    out["decode"] = dict(_delta(c0, c1), tokens=plan["decode_tokens"] - 1, cache=eng.cache_stats())
    out.update(ids=ids, prompt_tokens=len(prompt), vm_hwm_mb=_status_mb("VmHWM"), vm_rss_mb=_status_mb("VmRSS"))
    eng.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m bench.streaming_worker", __doc__)
    p.add_argument("--plan", required=True, help="JSON: model, mode, threads, io_threads, max_ctx, prompt_ids | "
                   "prompt_text, decode_tokens, decode_ids (optional), temperature, top_p, sample_seed, budget_mb and policy (stream; or slots and "
                   "probe: the budget for that many slots a layer, worked out in this process)")
    a = p.parse_args(argv)
    try:
        plan = json.loads(a.plan)
        np.seterr(all="ignore")
        print(json.dumps(probe(plan) if plan["mode"] == "probe" else measure(plan)), flush=True)
    except (OSError, ValueError, KeyError) as e:  # the driver records this line as the row's failure
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
