"""Expert streaming benchmark: decode under a memory budget (Engine(mem_budget_mb=), the expert cache) against
the all-resident engine and against plain mmap under the same memory cap.

    python -m bench.streaming [--matrix S@400,M@1000,L@1500,L@1000] [--quick] [--fresh] [--out bench/results]

For every MODEL@BUDGET of --matrix, three columns, each a fresh worker process (bench/streaming_worker.py)
started from cold storage (the model file evicted from the page cache, checked with mincore):
  resident  the normal engine with the whole file read into memory first (no cap): the speed to aim for;
  stream    --mem-budget BUDGET (the default LFU expert cache, O_DIRECT reads), run inside a child memory cgroup capped at
            BUDGET (page cache charged to it, as on a phone);
  mmap      the normal engine (mmap) inside the same cgroup cap: the kernel pages the file in and out.
If a memory cgroup cannot be made here (not root, no controller), the mmap column says why instead of running
uncapped, and the stream column runs under its own budget only. --policy-rows adds the cache policies' hit rates
(lru, lfu, pin) on a balanced random model and on the trained tiny model (`make train`). BUDGET is MiB, or N%:
that share of a layer's experts as cache slots (for small models, whose Python baseline dwarfs their experts).

Random models are model/init.py's balanced random exports of the presets (cached in --cache-dir and reused);
prompts are fixed random token ids and the decode steps are fed fixed random ids too (teacher-forced: a random
model's own samples loop on one or two tokens, which would flatter the cache); the trained model gets
--trained-prompt and feeds back its own samples. Every step's sampled token (fixed seed) is recorded: the
engine's logits are bit-identical under any budget, so every column must give the same tokens (the report
checks). The storage's own O_DIRECT sequential and 1 MiB random
read bandwidth is measured on the largest model file in the same run.

Resumable: each finished row is saved in <out>/streaming_raw.json at once; a rerun with the same settings
skips the rows it holds (--fresh measures everything again). Writes <out>/streaming.md, streaming.png and
streaming_raw.json. Code: bench/streaming_runs.py (models, rows), bench/streaming_sys.py (cgroup, page cache,
storage bandwidth), bench/streaming_worker.py, bench/streaming_report.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np

from bench import streaming_runs as runs
from bench import streaming_sys
from bench.machine import REPO, engine_commit, loadavg, machine_info
from bench.streaming_report import write_report
from mobile.engine import CACHE_POLICIES, DEFAULT_CACHE_POLICY, default_lib_path
from model import cli
from model.atomic import atomic_write

MODELS = ("S", "M", "L", "quick", "trained")
QUICK = dict(matrix="quick@40%", policy_rows="quick@40%,trained@25%", goal="quick@40%", prompt_tokens=16, decode_tokens=16,
             trained_decode_tokens=32, storage_seq_mib=16, storage_rand_reads=32)
RAW_VERSION = 1


def build_parser():
    p = cli.parser("python -m bench.streaming", __doc__)
    p.add_argument("--matrix", default="S@400,M@1000,L@1500,L@1000", help="MODEL@BUDGET,... measured in all three "
                   f"columns; MODEL of {cli.choices(MODELS)}, BUDGET MiB or N%%")
    p.add_argument("--policy-rows", default="S@400,trained@25%,trained@50%",
                   help=f"MODEL@BUDGET,... whose stream column is measured with every policy ({cli.choices(CACHE_POLICIES)})")
    p.add_argument("--goal", default="L@1500", help="the MODEL@BUDGET of --matrix the goal (stream >= 0.5x resident "
                   "and >= 3x mmap) is reported for")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="engine threads")
    p.add_argument("--io-threads", type=cli.int_range(1, 16), default=2, help="expert-cache read threads")
    p.add_argument("--prompt-tokens", type=cli.positive_int, default=64, help="random prompt ids (random models)")
    p.add_argument("--temperature", type=cli.positive_float, default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=cli.float_range(0, 1, lo_open=True), default=0.95, help="nucleus sampling")
    p.add_argument("--decode-tokens", type=cli.int_range(2), default=64, help="tokens generated a run "
                   "(the first comes from the prompt's logits; the rest are the timed decode steps)")
    p.add_argument("--trained", default=str(REPO / "runs" / "tiny" / "model.mmoe"), help="the trained model")
    p.add_argument("--trained-prompt", default="To be, or not to be, that is the question:\nWhether 'tis nobler "
                   "in the mind to suffer", help="its prompt (text)")
    p.add_argument("--trained-decode-tokens", type=cli.int_range(2), default=128, help="its generated tokens")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="random-weight and prompt-id seed")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mobilemoe" / "bench"),
                   help="where the random exports are kept and reused (GBs)")
    p.add_argument("--out", default="", help="report directory (default: bench/results; --quick: "
                   "<cache-dir>/quick-results)%(default)s")
    p.add_argument("--storage-seq-mib", type=cli.positive_int, default=1024, help="MiB read sequentially (O_DIRECT)")
    p.add_argument("--storage-rand-reads", type=cli.positive_int, default=256, help="random 1 MiB O_DIRECT reads")
    p.add_argument("--timeout", type=cli.positive_float, default=3600, help="seconds per worker process")
    p.add_argument("--quick", action="store_true", help="smoke matrix: " + ", ".join(f"{k}={v}" for k, v in
                   QUICK.items()).replace("%", "%%") + " (overrides those options)")
    p.add_argument("--fresh", action="store_true", help="measure every row again (ignore the saved rows)")
    return p


def _options(a) -> dict:
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    if not default_lib_path().is_file():
        raise cli.BadInput(f"{default_lib_path()} not found: build the engine first (make mobile)")
    matrix = runs.parse_spec(a.matrix, "--matrix", MODELS)
    policy_rows = runs.parse_spec(a.policy_rows, "--policy-rows", MODELS)
    goal = runs.parse_spec(a.goal, "--goal", MODELS)[0]
    out = Path(a.out) if a.out else (Path(a.cache_dir) / "quick-results" if a.quick else REPO / "bench" / "results")
    ctx = max(a.prompt_tokens + a.decode_tokens, 256 + a.trained_decode_tokens) + 1  # the trained prompt: < 256 tokens
    return dict(matrix=matrix, policy_rows=policy_rows, goal=goal, threads=a.threads, io_threads=a.io_threads,
                max_ctx=ctx, timeout=a.timeout, out=out, cache=Path(a.cache_dir), trained=Path(a.trained))


def _signature(a, o) -> dict:
    """The settings a row's figures depend on: a saved row is reused only under the same ones."""
    return dict(threads=a.threads, io_threads=a.io_threads, prompt_tokens=a.prompt_tokens,
                decode_tokens=a.decode_tokens, trained_prompt=a.trained_prompt, temperature=a.temperature, top_p=a.top_p,
                trained_decode_tokens=a.trained_decode_tokens, seed=a.seed, max_ctx=o["max_ctx"])


def _plan_rows(o: dict) -> list[tuple[str, str, str, str | None]]:
    """(model, budget spec, variant, policy) in measuring order: per model the resident row, then per budget
    stream and mmap side by side, then the other policies."""
    rows: list = []

    def add(r):
        if r not in rows:
            rows.append(r)

    for name, b in o["matrix"]:
        add((name, "-", "resident", None))
        add((name, b, "stream", DEFAULT_CACHE_POLICY))
        add((name, b, "mmap", None))
    for name, b in o["policy_rows"]:
        add((name, "-", "resident", None))
        for pol in CACHE_POLICIES:
            add((name, b, "stream", pol))
    return rows


def _key(r) -> str:
    return "|".join(str(x) for x in r)


def _sigterm(*_):
    raise SystemExit(143)  # unwinds like ^C: subprocess.run kills the worker, its cgroup is removed


def _main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    a = build_parser().parse_args(argv)
    o = _options(a)
    out, sig = o["out"], None

    def log(msg):
        print(f"[bench.streaming] {msg}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    o["cache"].mkdir(parents=True, exist_ok=True)
    raw_path = out / "streaming_raw.json"
    sig = _signature(a, o)
    raw = dict(version=RAW_VERSION, signature=sig, rows={}, probes={}, storage=None)
    if raw_path.is_file() and not a.fresh:
        try:
            saved = json.loads(raw_path.read_text())
        except ValueError as e:
            raise cli.BadInput(f"{raw_path}: not valid JSON ({e}); rerun with --fresh") from None
        if saved.get("version") == RAW_VERSION and saved.get("signature") == sig:
            raw.update(saved)
            log(f"resuming: {len(raw['rows'])} rows kept from {raw_path} (--fresh measures them again)")
        else:
            log(f"{raw_path} was measured with other settings: measuring afresh")

    def save():
        atomic_write(raw_path, json.dumps(raw, indent=1))

    plan = _plan_rows(o)
    names = list(dict.fromkeys(r[0] for r in plan))
    log(f"models {names} in {o['cache']}")
    models = runs.prepare(names, o["cache"], a.seed, o["trained"], log)
    cap_reason = streaming_sys.MemCgroup.probe()
    log("memory cgroup: " + (cap_reason or "usable (the mmap and stream columns run under the budget as a cap)"))
    raw["cap_unavailable"] = cap_reason
    raw["commit"], raw["started"] = raw.get("commit") or engine_commit(), raw.get("started") or \
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    files = [p for p in models.values() if isinstance(p, Path)]
    if raw.get("storage") is None and files:
        big = max(files, key=lambda p: p.stat().st_size)
        log(f"storage bandwidth (O_DIRECT) on {big}")
        raw["storage"] = streaming_sys.storage_bandwidth(big, a.storage_seq_mib, a.storage_rand_reads, a.seed)
        s = raw["storage"]
        log(f"  sequential {s['seq_mb_s']:.0f} MB/s, random 1 MiB {s['rand_mb_s']:.0f} MB/s "
            f"({s['rand_iops']:.0f} reads/s), direct={s['direct']}")
        save()
    t_start = time.time()
    todo = [r for r in plan if _key(r) not in raw["rows"]]
    log(f"{len(plan) - len(todo)} of {len(plan)} rows already measured; {len(todo)} to go")
    for i, (name, spec, variant, policy) in enumerate(todo):
        path = models[name]
        key = _key((name, spec, variant, policy))
        if not isinstance(path, Path):
            raw["rows"][key] = dict(variant=variant, policy=policy, unavailable=path)
            save()
            continue
        if name not in raw["probes"]:
            raw["probes"][name] = runs.probe(path, o)
        pr = raw["probes"][name]
        budget = None if spec == "-" else runs.budget_mb(spec, pr)
        if budget is not None and budget < pr["min_budget_mb"]:
            row = dict(variant=variant, policy=policy, budget_mb=budget,
                       unavailable=f"{budget:.0f} MiB is below the engine's minimum {pr['min_budget_mb']:.0f} MiB")
        else:
            prompt = (dict(prompt_text=a.trained_prompt, decode_tokens=a.trained_decode_tokens) if name == "trained"
                      else dict(prompt_ids=[int(x) for x in np.random.default_rng(a.seed).integers(
                          0, pr["vocab_size"], a.prompt_tokens)], decode_tokens=a.decode_tokens,
                                   decode_ids=[int(x) for x in np.random.default_rng(a.seed + 1).integers(
                                       0, pr["vocab_size"], a.decode_tokens - 1)]))
            prompt.update(temperature=a.temperature, top_p=a.top_p, sample_seed=a.seed)
            t = time.time()
            k = runs.slots(spec, pr) if spec != "-" else None
            row = runs.run_row(path, variant, budget, policy, prompt, o, cap_reason,
                               dict(slots=k, probe=pr) if k and variant == "stream" else None)
            row["measured_s"] = time.time() - t
        row.update(model=name, spec=spec)
        raw["rows"][key] = row
        save()
        log(f"[{i + 1}/{len(todo)}] {_describe(row)}")
    raw["machine"] = machine_info()
    raw["duration_s"] = raw.get("duration_s", 0.0) + time.time() - t_start
    raw["loadavg_end"] = loadavg()
    save()
    md, png = write_report(raw, plan, o["goal"], out)
    log(f"wrote {md}, {png} and {raw_path}")
    return 0


def _describe(r: dict) -> str:
    head = f"{r['model']:>7} {r['spec']:>5} {r['variant']:>8} {r.get('policy') or '':>3}"
    if "unavailable" in r or "failed" in r:
        return f"{head}: {r.get('unavailable') or r.get('failed')}"
    d = r["decode"]
    hit = d["cache"].get("hit_rate")
    return (f"{head}: decode {d['tokens'] / d['s']:.2f} tok/s, {d['storage_bytes'] / d['tokens'] / 1e6:.1f} MB "
            f"read/token" + (f", hit {hit:.1%}, stall {d['cache']['stall_s']:.2f} s" if hit is not None else "")
            + f", VmHWM {r['vm_hwm_mb']:.0f} MiB" + (f" (budget {r['budget_mb']:.0f})" if r.get("budget_mb") else "")
            + f"  [{r['measured_s']:.0f} s, load {r['loadavg_end']}]")


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
