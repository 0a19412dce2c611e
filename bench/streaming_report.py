"""bench.streaming's report: the markdown tables (decode per size / budget / column, the goal, cache policies)
and the tok/s plot, from the raw JSON alone (so a saved run's report can be rebuilt)."""

from __future__ import annotations

from pathlib import Path

from bench.machine import describe_commit
from mobile.engine import DEFAULT_CACHE_POLICY
from model.atomic import atomic_write

COLUMNS = ("resident", "stream", "mmap")
POLICIES = ("lru", "lfu", "pin")
GOAL_RESIDENT, GOAL_MMAP = 0.5, 3.0


def _key(*parts) -> str:
    return "|".join(str(x) for x in parts)


def _ok(r: dict | None) -> bool:
    return bool(r) and "decode" in r


def tok_s(r: dict | None) -> float | None:
    return r["decode"]["tokens"] / r["decode"]["s"] if _ok(r) and r["decode"]["s"] > 0 else None


def _why(r: dict | None) -> str:
    if not r:
        return "not measured"
    return r.get("unavailable") and f"unavailable: {r['unavailable']}" or f"failed: {r.get('failed', '?')}"


def _f(x, fmt=".2f", none="-") -> str:
    return none if x is None else format(x, fmt)


def goal(raw: dict, model: str, spec: str) -> dict:
    rows = raw["rows"]
    res, st, mm = (rows.get(_key(model, "-", "resident", "None")), rows.get(_key(model, spec, "stream", DEFAULT_CACHE_POLICY)),
                   rows.get(_key(model, spec, "mmap", "None")))
    g = dict(model=model, spec=spec, stream=tok_s(st), resident=tok_s(res), mmap=tok_s(mm))
    g["vs_resident"] = g["stream"] / g["resident"] if g["stream"] and g["resident"] else None
    g["vs_mmap"] = g["stream"] / g["mmap"] if g["stream"] and g["mmap"] else None
    g["mmap_note"] = None if _ok(mm) else _why(mm)
    return g


def _met(x, target) -> str:
    return "not measured" if x is None else ("met" if x >= target else "missed")


def _main_table(raw: dict, plan: list) -> list[str]:
    rows = raw["rows"]
    out = ["| model | budget MiB | column | decode tok/s | x resident | prefill tok/s | decode hit rate | storage MB "
           "/ token | I/O wait s (share) | compute s | major faults / token | VmHWM MiB | cgroup peak MiB | "
           "slots / layer | tokens = resident | load avg (1 min, end) |", "|" + "---|" * 16]
    seen, shown_resident = [], set()
    for model, spec, variant, policy in plan:
        if variant == "resident" or (variant == "stream" and policy != DEFAULT_CACHE_POLICY) or (model, spec) in seen:
            continue
        if not any(m == model and s == spec and v == "mmap" for m, s, v, _ in plan):
            continue  # a policy-only row: in the policy table
        seen.append((model, spec))
        res = rows.get(_key(model, "-", "resident", "None"))
        for col in COLUMNS:
            if col == "resident" and model in shown_resident:
                continue  # one resident row a model, above its first budget
            shown_resident.add(model)
            r = rows.get(_key(model, "-", "resident", "None") if col == "resident" else
                         _key(model, spec, col, DEFAULT_CACHE_POLICY if col == "stream" else "None"))
            b = r.get("budget_mb") if r else None
            budget = ("- (no cap)" if col == "resident" else _f(b, ".0f") if b is not None else spec)
            if not _ok(r):
                out.append(f"| {model} | {budget} | {col} | {_why(r)} |" + " |" * 12)
                continue
            d, p, c = r["decode"], r["prefill"], r["decode"]["cache"]
            ts, tr = tok_s(r), tok_s(res)
            stall = c.get("stall_s")
            share = f"{stall:.2f} ({stall / d['s']:.0%})" if stall is not None else "-"
            compute = d["s"] - stall if stall is not None else None
            same = "-" if col == "resident" else ("yes" if _ok(res) and r["ids"] == res["ids"] else
                                                  ("no" if _ok(res) else "?"))
            out.append(
                f"| {model} | {budget} | {col} | {ts:.2f} | {_f(ts / tr if tr else None)} | "
                f"{p['tokens'] / p['s']:.1f} | {_f(c.get('hit_rate'), '.1%')} | "
                f"{d['storage_bytes'] / d['tokens'] / 1e6:.1f} | {share} | {_f(compute)} | "
                f"{d['major_faults'] / d['tokens']:.0f} | {r['vm_hwm_mb']:.0f} | {_f(r.get('cgroup_peak_mb'), '.0f')} | "
                f"{c.get('slots_per_layer', '-')} | {same} | {r.get('loadavg_end', '?').split()[0]} |")
    return out


def _policy_table(raw: dict, plan: list) -> list[str]:
    rows = raw["rows"]
    out = ["| model | budget MiB | slots / layer of experts | " + " | ".join(
        f"{p} hit rate / MB per token / tok/s" for p in POLICIES) + " | tokens = resident |",
        "|" + "---|" * (4 + len(POLICIES))]
    done = []
    for model, spec, variant, _ in plan:
        if variant != "stream" or (model, spec) in done or not all(
                _key(model, spec, "stream", p) in rows for p in POLICIES):
            continue
        done.append((model, spec))
        rs = [rows[_key(model, spec, "stream", p)] for p in POLICIES]
        if not any(_ok(r) for r in rs):
            out.append(f"| {model} | {spec} | {_why(rs[0])} |" + " |" * (1 + len(POLICIES)))
            continue
        ref = next(r for r in rs if _ok(r))
        n_exp = raw["probes"].get(model, {}).get("n_experts", "?")
        cells = []
        for r in rs:
            if not _ok(r):
                cells.append(_why(r))
                continue
            d = r["decode"]
            cells.append(f"{d['cache']['hit_rate']:.1%} / {d['storage_bytes'] / d['tokens'] / 1e6:.2f} / "
                         f"{tok_s(r):.1f}")
        res = rows.get(_key(model, "-", "resident", "None"))
        same = "?" if not _ok(res) else ("no" if any(_ok(r) and r["ids"] != res["ids"] for r in rs) else
                                         "yes" if all(_ok(r) for r in rs) else "? (a run failed)")
        out.append(f"| {model} | {ref['budget_mb']:.1f}{f' ({spec})' if spec.endswith('%') else ''} | {ref['decode']['cache']['slots_per_layer']} of "
                   f"{n_exp} | " + " | ".join(cells) + f" | {same} |")
    return out


def write_plot(raw: dict, plan: list, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    groups = list(dict.fromkeys((m, s) for m, s, v, _ in plan if v == "mmap"))
    rows = raw["rows"]
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) + 2), 3.8))
    x, w = np.arange(len(groups)), 0.27
    for j, col in enumerate(COLUMNS):
        ys = [tok_s(rows.get(_key(m, "-", "resident", "None") if col == "resident" else
                             _key(m, s, col, DEFAULT_CACHE_POLICY if col == "stream" else "None"))) for m, s in groups]
        ax.bar(x + (j - 1) * w, [y or 0 for y in ys], w, label=col if col != "mmap" else "mmap under the cap")
        for xi, y in zip(x, ys):
            ax.text(xi + (j - 1) * w, (y or 0), "n/a" if y is None else f"{y:.2g}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(x, [f"{m} @ {s} MiB" if not s.endswith("%") else f"{m} @ {s}" for m, s in groups])
    ax.set_ylabel("decode tok/s")
    ax.set_title("decode under a memory budget (cold storage)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def report_text(raw: dict, plan: list, goal_spec: tuple[str, str], png_name: str) -> str:
    sig, m, st = raw["signature"], raw.get("machine", {}), raw.get("storage") or {}
    g = goal(raw, *goal_spec)
    evicted = [r["evicted_left"] for r in raw["rows"].values() if "evicted_left" in r]
    cap = raw.get("cap_unavailable")
    lines = [
        "# Expert streaming: decode under a memory budget",
        "",
        "Generated by `python -m bench.streaming` (`make bench-streaming`); the method is in its `--help`.",
        "",
        f"- Started {raw.get('started', '?')}, {raw.get('duration_s', 0) / 60:.0f} min measuring (this and earlier "
        f"resumed runs); load average at the end {raw.get('loadavg_end', '?')} (rows carry their own).",
        f"- Engine commit: {describe_commit(raw.get('commit'))}.",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, {m.get('mem_gb', '?')} GB, SIMD "
        f"{', '.join(m.get('flags', [])) or '?'}; {m.get('platform', '?')}.",
        f"- Engine threads {sig['threads']}, I/O threads {sig['io_threads']}; random models: a "
        f"{sig['prompt_tokens']}-token random prompt, then {sig['decode_tokens'] - 1} timed decode steps fed fixed "
        f"random ids, {sig['decode_tokens']} tokens sampled; trained model: its text prompt then "
        f"{sig['trained_decode_tokens']} tokens it samples and feeds back; temperature {sig['temperature']}, top-p {sig['top_p']}, "
        f"seed {sig['seed']}; KV cache {sig['max_ctx']} positions in every column.",
        f"- Storage (O_DIRECT={st.get('direct', '?')}, {st.get('file', '?')}): sequential "
        f"{_f(st.get('seq_mb_s'), '.0f')} MB/s, random 1 MiB reads {_f(st.get('rand_mb_s'), '.0f')} MB/s "
        f"({_f(st.get('rand_iops'), '.0f')} reads/s).",
        f"- Cold storage: every run starts with its model file evicted from the page cache (fsync + "
        f"POSIX_FADV_DONTNEED); mincore afterwards found at most {_f(max(evicted) if evicted else None, '.1%')} "
        "of a file still cached.",
        "- Memory cap: " + (f"unavailable: {cap}; the mmap column is not measured and the stream column runs "
                            "under its own budget only." if cap else
                            "a child memory cgroup per run, limit = the budget, page cache charged to it; the stream "
                            "and mmap columns run inside it, the resident column has no cap."),
        "- Reading it: hit rates, bytes read, VmHWM and tokens are deterministic; tok/s depends on whatever "
        "else the machine ran (the load average column), so the columns of one size and budget run back to back "
        "and their ratios are the figures to compare. A VM's O_DIRECT reads may be served from the host's cache: "
        "the storage line above is what this run's reads saw, not a phone's flash.",
        "",
        f"## Goal: {g['model']} under {g['spec']} MiB",
        "",
        f"- stream / all-resident decode: {_f(g['vs_resident'])}x (goal >= {GOAL_RESIDENT}x: "
        f"{_met(g['vs_resident'], GOAL_RESIDENT)})",
        f"- stream / mmap under the same cap: {_f(g['vs_mmap'])}x (goal >= {GOAL_MMAP:.0f}x: "
        f"{_met(g['vs_mmap'], GOAL_MMAP)})" + (f"; mmap {g['mmap_note']}" if g["mmap_note"] else ""),
        "",
        "## Decode per size and budget",
        "",
        f"resident: the whole file read into memory, then the normal engine; stream: `--mem-budget` "
        f"({DEFAULT_CACHE_POLICY.upper()}, the default policy); mmap: "
        "the normal engine under the cap. Storage MB / token: this process's storage reads during decode "
        "(/proc/self/io read_bytes: O_DIRECT reads and page faults alike). I/O wait: the engine's stall time "
        "(compute waiting for expert reads); the mmap column's waits are inside its page faults, which the "
        "engine cannot time (its major faults are counted instead); compute = decode time - I/O wait.",
        "",
        *_main_table(raw, plan),
        "",
        f"![decode tok/s]({png_name})",
        "",
        "## Cache policies",
        "",
        "The decode phase's expert-cache hit rate ((layer, step, selected expert) uses served from the cache), "
        "storage MB read a token and tok/s, per policy. The balanced random model routes like a load-balanced "
        "trained one without a trained model's preferences; the trained tiny model (`make train`) has them.",
        "",
        *_policy_table(raw, plan),
        "",
    ]
    return "\n".join(lines)


def write_report(raw: dict, plan: list, goal_spec: tuple[str, str], out: Path) -> tuple[Path, Path]:
    png = write_plot(raw, plan, out / "streaming.png")
    md = out / "streaming.md"
    atomic_write(md, report_text(raw, plan, goal_spec, png.name))
    return md, png
