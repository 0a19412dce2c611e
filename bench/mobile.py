"""Phone-engine benchmark: our INT4 engine vs llama.cpp (same model as GGUF Q4_0), MoE vs dense, roofline.

    python -m bench.mobile [--sizes S,dense-1B,M,L] [--threads 1,2] [--repeats 5]
                           [--work /tmp/mmoe-bench] [--out bench/results]

Models are RANDOM-WEIGHT models with the real S / M / L / dense-1B shapes (speed does not depend on the
values; routing of random weights is near-uniform, which is the balanced case training aims for). Our
engine runs the .mmoe file from `python -m mobile export --random-init`; llama.cpp runs that same file
converted to GGUF Q4_0 by mobile/gguf_export.py (`--from-mmoe`: our INT4 g32 blocks are bit-compatible with
ggml's block_q4_0, so only the scales move): both engines run exactly the same weights and read the same bytes.

Each measurement is a fresh process (the worker mode of this module) that loads the model and times: prefill
of a 128- and a 512-token prompt (one batched eval each, empty cache), decode of N new tokens at context 1024
(the 512-token prompt's cache plus an untimed 512-token prefill) and at context 0 (N single-token evals from
an empty cache). Token ids are fixed random ids, fed teacher-forced, so both engines do the same work. Engines
are interleaved (their order alternates every repeat), every (size, threads) pair is repeated, medians are
reported and engine ratios are computed pair by pair (ours_i / llama_i of the same repeat), then the median. A
STREAM triad (bench/stream.c) measures memory bandwidth on the same machine; decode is reported as a fraction
of the roofline tok/s x (INT4 bytes read per token, model.config.int4_weight_bytes) / bandwidth. Our decode is
profiled with the engine's per-op timers (mmoe_profile_get).

Writes <out>/mobile.md, <out>/mobile_{decode,prefill,roofline,profile}.png and <out>/mobile_raw.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mobile.engine import TIMERS, Engine

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "mobile" / "build" / "libmmoe.so"
ALL_SIZES = ("S", "dense-1B", "M", "L")
ENGINES = ("ours", "llama.cpp")
MAX_CTX = 2048


# ================================================================================================
# Worker side: one fresh process per (engine, model, threads); prints one JSON line.
# ================================================================================================
def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class OursRunner:
    """Our engine through mobile.engine.Engine (the ctypes binding of mobile/c/mmoe.h that `mobile generate` uses)."""

    def __init__(self, path: str, threads: int):
        self.engine = Engine(path, threads=threads, max_ctx=MAX_CTX, lib=LIB)
        self.kernels = self.engine.kernels

    def reset(self) -> None:
        self.engine.reset()

    def eval(self, ids: list[int]) -> None:
        self.engine.eval(ids)

    def profile_reset(self) -> None:
        self.engine.profile_reset()

    def profile(self) -> dict[str, float]:
        return self.engine.profile()

    def close(self) -> None:
        self.engine.close()


class LlamaRunner:
    """llama.cpp through llama-cpp-python's low-level API (no Python-side logits copies or score arrays)."""

    def __init__(self, path: str, threads: int):
        import llama_cpp as L  # noqa: PLC0415

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = MAX_CTX, 512, 512
        cp.n_threads, cp.n_threads_batch = threads, threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(512, 0, 1)
        self.kernels = L.llama_print_system_info().decode() if hasattr(L, "llama_print_system_info") else ""
        self.pos = 0

    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.pos = 0

    def eval(self, ids: list[int]) -> None:
        L, b = self.L, self.batch
        for s in range(0, len(ids), 512):  # n_batch = 512: longer prompts go in 512-token chunks
            chunk = ids[s:s + 512]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = self.pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = i == len(chunk) - 1
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            L.llama_synchronize(self.ctx)
            self.pos += len(chunk)

    def profile_reset(self) -> None:
        pass

    def profile(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def worker(engine: str, model: str, threads: int, plan: dict) -> dict:
    rng = np.random.default_rng(plan["seed"])
    t0 = time.perf_counter()
    r = OursRunner(model, threads) if engine == "ours" else LlamaRunner(model, threads)
    out: dict = dict(engine=engine, threads=threads, load_s=time.perf_counter() - t0, kernels=r.kernels,
                     prefill={}, decode={}, profile={})
    lo, hi = plan["id_range"]
    r.eval([int(rng.integers(lo, hi))])  # warm-up: first-touch of the code paths and mmap'd weights
    prompts = sorted(plan["prompts"])
    for n in prompts:
        r.reset()
        ids = [int(x) for x in rng.integers(lo, hi, n)]
        t = time.perf_counter()
        r.eval(ids)
        out["prefill"][str(n)] = time.perf_counter() - t
    # The cache now holds the longest prompt (pos = prompts[-1]). The first decode context at least that long
    # starts from it and prefills only the rest, untimed: the same state as a fresh prefill of ctx random ids,
    # and on the largest models it saves a third of the worker's prompt tokens.
    pos, reuse = (prompts[-1], True) if prompts else (0, False)
    for ctx in sorted(plan["decode_contexts"], key=lambda c: (c < pos, c)):
        if not (reuse and pos <= ctx):
            r.reset()
            pos = 0
        reuse = False  # only the first context may start from the prompt's cache
        if ctx > pos:
            r.eval([int(x) for x in rng.integers(lo, hi, ctx - pos)])
        ids = [int(x) for x in rng.integers(lo, hi, plan["decode_tokens"])]
        r.profile_reset()
        t = time.perf_counter()
        for tok in ids:
            r.eval([tok])
        out["decode"][str(ctx)] = time.perf_counter() - t
        out["profile"][str(ctx)] = r.profile()
    out["peak_rss_mb"] = _peak_rss_mb()
    r.close()
    return out


# ================================================================================================
# Driver side
# ================================================================================================
def _run(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (rc {p.returncode}): {' | '.join(tail)}")
    return p.stdout


def prepare_models(sizes: list[str], work: Path, seed: int, log) -> dict[str, dict[str, Path]]:
    """{size: {"ours": .mmoe, "llama.cpp": .gguf}}; reuses files whose stamp (size, seed) matches."""
    from mobile.gguf_export import mmoe_to_gguf  # noqa: PLC0415

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in sizes:
        mm, gg = work / f"{s}-random.mmoe", work / f"{s}-random-q4_0.gguf"
        stamp = work / f"{s}.stamp.json"
        want = dict(size=s, seed=seed, format=4)  # 4: model/init.py's balanced random init
        fresh = stamp.is_file() and json.loads(stamp.read_text()) == want and mm.is_file() and gg.is_file()
        if not fresh:
            t = time.time()
            if (REPO / "mobile" / "__main__.py").is_file():  # the documented CLI (engineer A's mobile/)
                _run([sys.executable, "-m", "mobile", "export", "--random-init", "--size", s, "--seed", str(seed),
                      "--out", str(mm)])
            else:
                _run([sys.executable, "-c", "import sys; from mobile.export import export_random; "
                      "export_random(sys.argv[1], sys.argv[2], seed=int(sys.argv[3]))", s, str(mm), str(seed)])
            log(f"  exported {mm.name} ({mm.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
            t = time.time()
            mmoe_to_gguf(mm, gg)  # the same INT4 weights, re-laid out as Q4_0: both engines run one model
            log(f"  exported {gg.name} ({gg.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
            stamp.write_text(json.dumps(want))
        out[s] = {"ours": mm, "llama.cpp": gg}
    return out


def stream_bandwidth(threads: list[int], work: Path) -> dict[int, dict]:
    exe = work / "stream"
    src = REPO / "bench" / "stream.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        cc = os.environ.get("CC", "gcc")
        _run([cc, "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)])
    res = {}
    for t in threads:
        res[t] = json.loads(_run([str(exe), str(t), "256", "20"]).strip().splitlines()[-1])
    return res


def machine_info() -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count())
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for line in txt.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                        "avx512_bf16", "amx_int8", "sse4_2")
                info["flags"] = [f for f in keep if f in flags]
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        info["lscpu"] = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in
                         _run(["lscpu"]).splitlines() if ":" in ln)
                         if k.strip() in ("Model name", "Hypervisor vendor", "L2 cache", "L3 cache", "CPU family", "Model")}
    except Exception as e:  # noqa: BLE001  (informational only)
        info["error"] = str(e)
    vers = {}
    try:
        import llama_cpp  # noqa: PLC0415

        vers["llama-cpp-python"] = llama_cpp.__version__
    except Exception:  # noqa: BLE001
        vers["llama-cpp-python"] = "not installed"
    try:
        from importlib.metadata import version  # noqa: PLC0415

        vers["gguf"] = version("gguf")
    except Exception:  # noqa: BLE001
        vers["gguf"] = "?"
    try:
        vers["gcc"] = _run(["gcc", "--version"]).splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        vers["git"] = _run(["git", "rev-parse", "--short", "HEAD"]).strip()
    except Exception:  # noqa: BLE001
        pass
    info["versions"] = vers
    return info


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def parse_repeats(spec: str, sizes: list[str]) -> dict[str, int]:
    out = {}
    if "=" not in spec:
        return {s: int(spec) for s in sizes}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    for s in sizes:
        out.setdefault(s, min(out.values()) if out else 5)
    return out


def parse_kv_ints(spec: str, sizes: list[str], default: int) -> dict[str, int]:
    out = {s: default for s in sizes}
    if spec:
        for part in spec.split(","):
            k, v = part.split("=")
            out[k.strip()] = int(v)
    return out


def run_matrix(models: dict, sizes: list[str], threads: list[int], repeats: dict[str, int], plan_base: dict,
               decode_tokens: dict[str, int], engines: list[str], log, timeout: float,
               partial: Path | None = None) -> list[dict]:
    from model.config import get_config  # noqa: PLC0415

    rows = []
    for rep in range(max(repeats[s] for s in sizes)):
        for s in sizes:
            if rep >= repeats[s]:
                continue
            cfg = get_config(s)
            plan = dict(plan_base, decode_tokens=decode_tokens[s], id_range=[0, cfg.vocab_size],
                        seed=plan_base["seed"] + rep)
            for t in threads:
                order = engines if rep % 2 == 0 else list(reversed(engines))
                for e in order:
                    cmd = [sys.executable, "-m", "bench.mobile", "worker", "--engine", e, "--model",
                           str(models[s][e]), "--threads", str(t), "--plan", json.dumps(plan)]
                    t0 = time.time()
                    res = json.loads(_run(cmd, timeout=timeout).strip().splitlines()[-1])
                    res.update(size=s, rep=rep, decode_tokens=plan["decode_tokens"], loadavg=_loadavg())
                    rows.append(res)
                    if partial is not None:  # survives an interrupted run (--from-raw rebuilds the report)
                        _atomic_write_text(partial, json.dumps(rows))
                    d0 = res["decode"].get("0")
                    pl = plan["prompts"][-1]
                    log(f"  rep {rep} {s:>8} t{t} {e:>9}: prefill{pl} {pl / res['prefill'][str(pl)]:7.1f} tok/s"
                        f"  decode {plan['decode_tokens'] / d0 if d0 else float('nan'):6.2f} tok/s"
                        f"  rss {res['peak_rss_mb']:.0f} MB  ({time.time() - t0:.0f} s, load {_loadavg()})")
    return rows


# ---- aggregation ---------------------------------------------------------------------------------------
def _tps(row: dict, kind: str, key: str) -> float:
    n = int(key) if kind == "prefill" else row["decode_tokens"]
    v = row[kind].get(key)
    return n / v if v else float("nan")


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def aggregate(rows: list[dict], sizes, threads, engines, prompts, contexts) -> dict:
    """Medians per (size, threads, engine, metric) and pair-by-pair ratios."""
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
            if s in dense:
                continue
            for t in threads:
                for e in engines:
                    a, b = by.get((s, t, e), {}), by.get((d, t, e), {})
                    for kind, key in metrics:
                        rs = [_tps(a[i], kind, key) / _tps(b[i], kind, key) for i in a if i in b]
                        ratio_moe[(s, d, t, e, kind, key)] = _med(rs)
    return dict(med=med, ratio_eng=ratio_eng, ratio_moe=ratio_moe)


# ---- report --------------------------------------------------------------------------------------------
def _f(x, nd=1):
    return "—" if x != x else f"{x:.{nd}f}"


def write_plots(agg, sizes, threads, engines, bw, read_bytes, out: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    med = agg["med"]
    files = []

    def bars(kind, key, fname, title):
        fig, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 3.8), squeeze=False)
        for ax, t in zip(axes[0], threads):
            x = np.arange(len(sizes))
            w = 0.8 / len(engines)
            for j, e in enumerate(engines):
                ys = [med.get((s, t, e, kind, key), float("nan")) for s in sizes]
                ax.bar(x + (j - (len(engines) - 1) / 2) * w, ys, w, label=e)
                for xi, y in zip(x, ys):
                    if y == y:
                        ax.text(xi + (j - (len(engines) - 1) / 2) * w, y, f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                                ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, sizes)
            ax.set_title(f"{title}, {t} thread{'s' if t > 1 else ''}")
            ax.set_ylabel("tokens/s")
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)

    bars("decode", "0", "mobile_decode.png", "decode (ctx 0)")
    bars("prefill", "512", "mobile_prefill.png", "prefill (512-token prompt)")

    fig, ax = plt.subplots(figsize=(6 + len(threads), 3.8))
    x = np.arange(len(sizes))
    combos = [(e, t) for t in threads for e in engines]
    w = 0.8 / len(combos)
    for j, (e, t) in enumerate(combos):
        ys = [med.get((s, t, e, "decode", "0"), float("nan")) * read_bytes[s] / (bw[t]["best_gbs"] * 1e9)
              for s in sizes]
        ax.bar(x + (j - (len(combos) - 1) / 2) * w, [100 * y for y in ys], w, label=f"{e}, {t}t")
    ax.axhline(80, color="k", ls="--", lw=0.8)
    ax.set_xticks(x, sizes)
    ax.set_ylabel("% of STREAM roofline")
    ax.set_title("decode as a fraction of the bandwidth roofline (ctx 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mobile_roofline.png", dpi=110)
    plt.close(fig)
    files.append("mobile_roofline.png")

    if "ours" in engines:
        t = threads[0]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        bottom = np.zeros(len(sizes))
        for k in TIMERS:
            ys = np.array([1e3 * med.get((s, t, "ours", "profile", "0"), {}).get(k, 0.0) for s in sizes])
            ax.bar(sizes, ys, bottom=bottom, label=k)
            bottom += ys
        ax.set_ylabel("ms per decoded token")
        ax.set_title(f"our engine: decode time by op ({t} thread{'s' if t > 1 else ''}, ctx 0)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mobile_profile.png", dpi=110)
        plt.close(fig)
        files.append("mobile_profile.png")
    return files


def report_text(agg, sizes, threads, engines, prompts, contexts, bw, info, repeats, decode_tokens,
                weight_bytes, read_bytes, file_bytes, plots, started, elapsed, load_start, load_end) -> str:
    med, re, rm = agg["med"], agg["ratio_eng"], agg["ratio_moe"]
    L = []
    L.append("# Phone engine benchmark: MobileMoE INT4 engine vs llama.cpp, MoE vs dense\n")
    when = (f"on {started} in {elapsed / 60:.1f} min" if not started.startswith("rows of ")
            else f"from the saved {started} (measured in one run; report rebuilt with --from-raw)")
    L.append(f"Generated by `python -m bench.mobile` ({' '.join(sys.argv[1:]) or 'defaults'}) {when}. "
             "**Random weights** with the real preset shapes (speed does not depend on "
             "the values). All rows below come from this one run.\n")
    L.append("## Machine\n")
    L.append(f"- CPU: {info.get('cpu', '?')} ({info.get('cpus')} logical CPUs), "
             f"{info.get('lscpu', {}).get('Hypervisor vendor', 'bare metal')} guest; "
             f"L2 {info.get('lscpu', {}).get('L2 cache', '?')}, L3 {info.get('lscpu', {}).get('L3 cache', '?')}; "
             f"RAM {info.get('mem_gb', '?')} GB")
    L.append(f"- CPU flags (SIMD): {', '.join(info.get('flags', []))}")
    L.append(f"- OS: {info.get('platform')}; Python {info.get('python')}")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()))
    L.append(f"- Load average (1/5/15 min) at start: {load_start}; at end: {load_end}. "
             "The machine is shared with other jobs: absolute numbers are noisy, the interleaved pair-by-pair "
             "ratios much less so.")
    L.append("- STREAM triad (bench/stream.c, 3 x 256 MiB arrays, best of 20): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: {bw[t]['best_gbs']:.1f} GB/s (median {bw[t]['median_gbs']:.1f})"
        for t in threads))
    L.append("")
    L.append("## Method\n")
    L.append("Every measurement is a fresh process that loads the model (mmap) and runs, after a one-token "
             f"warm-up: prefill of prompts of {' and '.join(map(str, prompts))} tokens (one batched eval each, "
             f"empty cache); decode of N new tokens at context {' and '.join(map(str, contexts))} (after an "
             "untimed prefill of that context; the first context at least as long as the longest prompt continues "
             "from that prompt's cache), single-token evals, teacher-forced fixed random ids. Engines are interleaved (order alternates per repeat); medians over "
             "repeats; ratios are computed pair by pair (same repeat), then the median. llama.cpp runs the same .mmoe "
             "converted to GGUF Q4_0 by `mobile/gguf_export.py --from-mmoe` (bit-identical INT4 weights: every "
             "matrix Q4_0 incl. the tied embedding/head, router and norms F32); same thread count, n_batch 512, "
             "context 2048. Peak RSS = the worker process's VmHWM (Python interpreter included, mmap'd weights "
             "counted as touched).\n")
    L.append("| model | repeats | decode tokens N | INT4 weight bytes (config) | .mmoe file | .gguf file | "
             "INT4 bytes read / token |")
    L.append("|---|---|---|---|---|---|---|")
    for s in sizes:
        L.append(f"| {s} | {repeats[s]} | {decode_tokens[s]} | {weight_bytes[s] / 1e6:.0f} MB | "
                 f"{file_bytes[s]['ours'] / 1e6:.0f} MB | {file_bytes[s]['llama.cpp'] / 1e6:.0f} MB | "
                 f"{read_bytes[s] / 1e6:.0f} MB |")
    L.append("")
    L.append("## Results (median tokens/s)\n")
    hdr = ["model", "threads", "engine"] + [f"prefill {p}" for p in prompts] + [f"decode @ctx {c}" for c in contexts] \
        + ["decode roofline % (ctx 0)", "peak RSS MB"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for s in sizes:
        for t in threads:
            for e in engines:
                d0 = med.get((s, t, e, "decode", "0"), float("nan"))
                roof = 100 * d0 * read_bytes[s] / (bw[t]["best_gbs"] * 1e9)
                cells = [s, str(t), e] + [_f(med.get((s, t, e, "prefill", str(p)), float("nan"))) for p in prompts] \
                    + [_f(med.get((s, t, e, "decode", str(c)), float("nan")), 2) for c in contexts] \
                    + [_f(roof), _f(med.get((s, t, e, "rss", ""), float("nan")), 0)]
                L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Roofline: ceiling tok/s = STREAM bandwidth at that thread count / INT4 bytes read per token "
             "(active experts + attention + shared experts + LM head + router/norms; the KV cache is not counted). "
             + "; ".join(f"{s}: {bw[threads[-1]]['best_gbs'] * 1e9 / read_bytes[s]:.0f} tok/s at "
                         f"{threads[-1]} thread{'s' if threads[-1] > 1 else ''}" for s in sizes) + ".\n")
    if re:
        L.append("## Our engine / llama.cpp (pair-by-pair median ratio; > 1 = ours faster)\n")
        hdr = ["model", "threads"] + [f"prefill {p}" for p in prompts] + [f"decode @ctx {c}" for c in contexts]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for s in sizes:
            for t in threads:
                L.append("| " + " | ".join([s, str(t)] + [_f(re.get((s, t, "prefill", str(p)), float("nan")), 2)
                                                          for p in prompts]
                                           + [_f(re.get((s, t, "decode", str(c)), float("nan")), 2)
                                              for c in contexts]) + " |")
        L.append("")
    if rm:
        L.append("## MoE vs dense at comparable INT4 memory (pair-by-pair median speedup over the dense model)\n")
        hdr = ["MoE / dense", "threads", "engine"] + [f"prefill {p}" for p in prompts] + \
            [f"decode @ctx {c}" for c in contexts]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for k4 in sorted({k[:4] for k in rm}, key=lambda k: (sizes.index(k[0]), k[2], k[3])):
            s, d, t, e = k4
            L.append("| " + " | ".join([f"{s} / {d}", str(t), e]
                                       + [_f(rm.get((*k4, "prefill", str(p)), float("nan")), 2) for p in prompts]
                                       + [_f(rm.get((*k4, "decode", str(c)), float("nan")), 2) for c in contexts])
                     + " |")
        L.append("")
    if "ours" in engines:
        L.append("## Where our decode time goes (engine timers, ms per token, ctx 0, median)\n")
        L.append("| model | threads | " + " | ".join(TIMERS) + " | total | measured ms/token |")
        L.append("|" + "---|" * (len(TIMERS) + 4))
        for s in sizes:
            for t in threads:
                p = med.get((s, t, "ours", "profile", "0"), {})
                tot = sum(p.values()) if p else float("nan")
                d0 = med.get((s, t, "ours", "decode", "0"), float("nan"))
                L.append("| " + " | ".join([s, str(t)] + [_f(1e3 * p.get(k, float("nan")), 2) for k in TIMERS]
                                           + [_f(1e3 * tot, 2), _f(1e3 / d0 if d0 == d0 and d0 else float("nan"), 2)])
                         + " |")
        L.append("")
    L.append("Notes: llama.cpp's peak RSS includes its load-time repack of Q4_0 matrices into an interleaved "
             "layout (a second copy of most weights next to the mmap'd file); ours maps the file and reads it in "
             "place. Both worker processes include the Python interpreter (~30-40 MB). llama.cpp's thread pool "
             "spin-waits between ops, which suffers more than a blocking pool when the cores are oversubscribed.\n")
    L.append("## Plots\n")
    for p in plots:
        L.append(f"![{p}]({p})")
    L.append("")
    L.append("## Goals (from the issue; reported, never asserted)\n")
    L.append(goals_text(agg, sizes, threads, engines, bw, read_bytes))
    L.append("")
    return "\n".join(L)


def goals_text(agg, sizes, threads, engines, bw, read_bytes) -> str:
    med, re, rm = agg["med"], agg["ratio_eng"], agg["ratio_moe"]
    pk = str(max((int(k[4]) for k in med if k[3] == "prefill"), default=512))  # the longest prompt measured
    out = []
    for t in threads:
        if "S" in sizes and "dense-1B" in sizes and "ours" in engines:
            d = rm.get(("S", "dense-1B", t, "ours", "decode", "0"), float("nan"))
            p = rm.get(("S", "dense-1B", t, "ours", "prefill", pk), float("nan"))
            out.append(f"- {t} thread{'s' if t > 1 else ''}: S vs dense-1B on our engine: decode {_f(d, 2)}x "
                       f"(goal >= 3.4x: {'met' if d >= 3.4 else 'missed'}), prefill-{pk} {_f(p, 2)}x "
                       f"(goal >= 2.5x: {'met' if p >= 2.5 else 'missed'}).")
        if "S" in sizes and re:
            d = re.get(("S", t, "decode", "0"), float("nan"))
            p = re.get(("S", t, "prefill", pk), float("nan"))
            out.append(f"- {t} thread{'s' if t > 1 else ''}: ours / llama.cpp on S: decode {_f(d, 2)}x "
                       f"(goal >= 1.2x: {'met' if d >= 1.2 else 'missed'}), prefill-{pk} {_f(p, 2)}x "
                       f"(goal >= 1.0x: {'met' if p >= 1.0 else 'missed'}).")
        if "S" in sizes and "ours" in engines:
            d0 = med.get(("S", t, "ours", "decode", "0"), float("nan"))
            roof = d0 * read_bytes["S"] / (bw[t]["best_gbs"] * 1e9)
            out.append(f"- {t} thread{'s' if t > 1 else ''}: S decode at {_f(100 * roof)}% of the STREAM roofline "
                       f"(goal >= 80%: {'met' if roof >= 0.8 else 'missed'}).")
    return "\n".join(out)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        p = argparse.ArgumentParser(prog="python -m bench.mobile worker")
        p.add_argument("--engine", choices=ENGINES, required=True)
        p.add_argument("--model", required=True)
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--plan", required=True)
        a = p.parse_args(argv[1:])
        try:
            print(json.dumps(worker(a.engine, a.model, a.threads, json.loads(a.plan))))
        except (RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    p = argparse.ArgumentParser(prog="python -m bench.mobile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(ALL_SIZES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", default="5", help="N (>= 5 for the report the issue asks for), or SIZE=N,...")
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--decode-contexts", default="0,1024")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-tokens-by-size", default="", help="override per size, e.g. L=32")
    p.add_argument("--engines", default="ours,llama.cpp")
    p.add_argument("--work", default="/tmp/mmoe-bench", help="where the model files go (GBs; not the repo)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--from-raw", help="rebuild the report from saved worker rows (mobile_rows.partial.json of an "
                   "interrupted run, or mobile_raw.json) instead of measuring; STREAM is re-measured if absent")
    a = p.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    try:
        sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
        from model.config import PRESETS  # noqa: PLC0415

        bad = [s for s in sizes if s not in PRESETS]
        if bad:
            raise ValueError(f"unknown size(s) {bad}; choose from {sorted(PRESETS)} (tiny: smoke runs only)")
        threads = [int(t) for t in a.threads.split(",")]
        if any(t < 1 for t in threads):
            raise ValueError(f"--threads must be >= 1, got {a.threads}")
        engines = [e.strip() for e in a.engines.split(",")]
        if any(e not in ENGINES for e in engines):
            raise ValueError(f"--engines: choose from {ENGINES}, got {a.engines}")
        prompts = [int(x) for x in a.prompts.split(",")]
        contexts = [int(x) for x in a.decode_contexts.split(",")]
        repeats = parse_repeats(a.repeats, sizes)
        decode_tokens = parse_kv_ints(a.decode_tokens_by_size, sizes, a.decode_tokens)
        if max(prompts + [c + max(decode_tokens.values()) + 1 for c in contexts]) > MAX_CTX:
            raise ValueError(f"prompts / context + decode tokens must fit the {MAX_CTX}-token context")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "ours" in engines and not LIB.is_file():
        print(f"error: {LIB} not found: build the engine first (make mobile)", file=sys.stderr)
        return 2
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401, PLC0415
        except ImportError:
            print("error: llama-cpp-python is not installed (pip install -c constraints-cpu.txt -e '.[bench]')",
                  file=sys.stderr)
            return 2

    from model.config import get_config, int4_weight_bytes  # noqa: PLC0415

    started = f"rows of {a.from_raw}" if a.from_raw else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start, load_start = time.time(), _loadavg()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(Path(a.from_raw).read_text()) if a.from_raw else None
        if isinstance(saved, dict):  # a mobile_raw.json: rows and the STREAM figures of that run
            saved_bw = {int(k): v for k, v in saved["stream"].items()}
            saved = saved["rows"]
        else:
            saved_bw = None
        if saved is not None:
            saved = [r for r in saved if r["size"] in sizes and r["threads"] in threads and r["engine"] in engines]
            if not saved:
                raise RuntimeError(f"{a.from_raw}: no rows for sizes {sizes}, threads {threads}, engines {engines}")
            models = {s: {"ours": work / f"{s}-random.mmoe", "llama.cpp": work / f"{s}-random-q4_0.gguf"}
                      for s in sizes}
            for s in sizes:
                repeats[s] = len({r["rep"] for r in saved if r["size"] == s})
                decode_tokens[s] = next(r["decode_tokens"] for r in saved if r["size"] == s)
        else:
            log(f"[bench.mobile] preparing models in {work}")
            models = prepare_models(sizes, work, a.seed, log)
        log("[bench.mobile] STREAM triad")
        bw = saved_bw or stream_bandwidth(threads, work)
        for t in threads:
            log(f"  {t} thread(s): {bw[t]['best_gbs']:.1f} GB/s")
        plan = dict(prompts=prompts, decode_contexts=contexts, seed=a.seed)
        log(f"[bench.mobile] measuring {sizes} x threads {threads} x {engines}")
        if saved is not None:
            rows = saved
        else:
            rows = run_matrix(models, sizes, threads, repeats, plan, decode_tokens, engines, log, a.timeout,
                              partial=out / "mobile_rows.partial.json")
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_end = _loadavg()
    info = machine_info()
    weight_bytes = {s: int4_weight_bytes(get_config(s))["total"] for s in sizes}
    read_bytes = {s: int4_weight_bytes(get_config(s))["read_per_token"] for s in sizes}
    file_bytes = {s: {e: models[s][e].stat().st_size if models[s][e].is_file() else float("nan") for e in ENGINES}
                  for s in sizes}
    agg = aggregate(rows, sizes, threads, engines, prompts, contexts)
    plots = write_plots(agg, sizes, threads, engines, bw, read_bytes, out)
    md = out / "mobile.md"
    _atomic_write_text(md, report_text(agg, sizes, threads, engines, prompts, contexts, bw, info, repeats,
                                       decode_tokens, weight_bytes, read_bytes, file_bytes, plots, started,
                                       time.time() - t_start, load_start, load_end))
    raw = dict(info=info, stream=bw, rows=rows, sizes=sizes, threads=threads, engines=engines,
               repeats=repeats, decode_tokens=decode_tokens, read_bytes=read_bytes, weight_bytes=weight_bytes)
    _atomic_write_text(out / "mobile_raw.json", json.dumps(raw, indent=1))
    (out / "mobile_rows.partial.json").unlink(missing_ok=True)  # the complete rows are in mobile_raw.json
    log(f"[bench.mobile] wrote {md} and {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
