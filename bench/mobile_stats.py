"""bench.mobile's numbers from the worker rows: medians per (size, threads, engine, metric), engine ratios and
MoE-vs-dense ratios computed pair by pair (the same repeat of both sides, then the median), and the routing our
engine saw per size and phase."""

from __future__ import annotations

import statistics


def _tps(row: dict, kind: str, key: str) -> float:
    n = int(key) if kind == "prefill" else row["decode_tokens"]
    v = row[kind].get(key)
    return n / v if v else float("nan")


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def aggregate(rows: list[dict], sizes, threads, engines, prompts, contexts, trained=()) -> dict:
    """Medians per (size, threads, engine, metric) and pair-by-pair ratios. `trained`: the labels among `sizes`
    of trained checkpoints, which get engine ratios but no MoE-vs-dense ratio (their shapes are not the dense
    model's comparison point)."""
    metrics = [("prefill", str(p)) for p in prompts] + [("decode", str(c)) for c in contexts]
    by = {}
    for r in rows:
        by.setdefault((r["size"], r["threads"], r["engine"]), {})[r["rep"]] = r
    med, ratio_eng, ratio_moe = {}, {}, {}
    for (s, t, e), reps in by.items():
        for kind, key in metrics:
            med[(s, t, e, kind, key)] = _med([_tps(r, kind, key) for r in reps.values()])
        med[(s, t, e, "rss", "")] = _med([r["peak_rss_mb"] for r in reps.values()])
        prof = {}
        for r in reps.values():
            for k, v in (r["profile"].get("0") or {}).items():
                prof.setdefault(k, []).append(v / r["decode_tokens"])
        med[(s, t, e, "profile", "0")] = {k: _med(v) for k, v in prof.items()}
    if "ours" in engines and "llama.cpp" in engines:
        for s in sizes:
            for t in threads:
                a, b = by.get((s, t, "ours"), {}), by.get((s, t, "llama.cpp"), {})
                for kind, key in metrics:
                    rs = [_tps(a[i], kind, key) / _tps(b[i], kind, key) for i in a if i in b]
                    ratio_eng[(s, t, kind, key)] = _med(rs)
    dense = [s for s in sizes if s.startswith("dense")]
    for d in dense:
        for s in sizes:
            if s in dense or s in trained:
                continue
            for t in threads:
                for e in engines:
                    a, b = by.get((s, t, e), {}), by.get((d, t, e), {})
                    for kind, key in metrics:
                        rs = [_tps(a[i], kind, key) / _tps(b[i], kind, key) for i in a if i in b]
                        ratio_moe[(s, d, t, e, kind, key)] = _med(rs)
    return dict(med=med, ratio_eng=ratio_eng, ratio_moe=ratio_moe, routing=routing_summary(rows))


def routing_summary(rows: list[dict]) -> dict:
    """{(size, "prefill"|"decode", key): ...} over every row of our engine (all threads and repeats: routing does
    not depend on the thread count): the fewest distinct experts any MoE layer used in any run, the median over
    runs of the per-run median over layers, and the same for the max / mean expert load (1.0 = perfect balance),
    with its worst layer of any run. Rows from before the routing counters (no "routing" key) are skipped."""
    by: dict = {}
    for r in rows:
        for kind, per_key in (r.get("routing") or {}).items():
            for key, st in per_key.items():
                if st:
                    by.setdefault((r["size"], kind, key), []).append((r, st))
    out = {}
    for k, runs in by.items():
        sts = [st for _, st in runs]
        tokens = int(k[2]) if k[1] == "prefill" else runs[0][0]["decode_tokens"]
        out[k] = dict(runs=len(sts), tokens=tokens, n_experts=sts[0]["n_experts"], layers=sts[0]["layers"],
                      distinct_min=min(st["distinct_min"] for st in sts),
                      distinct_median=_med([st["distinct_median"] for st in sts]),
                      load_median=_med([st["load_median"] for st in sts]),
                      load_worst=max(st["load_worst"] for st in sts))
    return out
