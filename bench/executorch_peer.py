"""ExecuTorch as a second peer of our phone engine: the same random-weight dense-1B and S models, exported through
torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) with the llama example's 8da4w (int8 dynamic
per-token activations, INT4 g32 weights), timed with ExecuTorch's Python runtime, interleaved with our engine on
the model's .mmoe in one run.

    python -m bench.executorch_peer [--sizes dense-1B,S] [--threads 1,2] [--repeats 3] [--work /tmp/mmoe-bench]

ExecuTorch needs its own venv (bench/.venv-executorch, made by `make bench-executorch`: executorch 1.5.1 +
torchao 0.18, reusing the main venv's torch through a .pth file, so both sides run the same torch build). The
driver (this file, main venv) starts bench/executorch_worker.py there for the exports and the ExecuTorch timings,
and `python -m bench.mobile worker --engine ours` for ours: every measurement is a fresh process, engines
alternate their order every repeat, as in bench.mobile.

Models. Ours: `mobile export --random-init` (model/init.py "balanced", the same file bench.mobile times).
ExecuTorch: bench/executorch_model.random_mobilemoe builds MobileMoE with exactly those weights (the INT4 codes
dequantized), then bench/executorch_model.KVCacheLM (static KV cache, last-token logits) is quantized 8da4w and
lowered; torchao re-quantizes the dequantized INT4 values with its own g32 scales. For MoE sizes the worker first
tries to export MobileMoE.forward itself (--native-attempt, on by default) and records the step and error where
that fails; the timed MoE is then KVCacheLM's dense-compute formulation (all experts, non-selected gated to 0),
which the report names as such.

Writes <out>/executorch.md and <out>/executorch_raw.json (rows with bench.mobile's row keys, engine "executorch"
or "ours", so bench/mobile_stats.aggregate and bench/mobile_report can take them; plus the export records).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import engine_commit, loadavg, machine_info, run_cmd
from model import cli
from model.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]
ET_PYTHON = REPO / "bench" / ".venv-executorch" / "bin" / "python"
WORKER = REPO / "bench" / "executorch_worker.py"
ENGINES = ("ours", "executorch")
EXPORT_FORMAT = 2  # bump when bench/executorch_model.py or the worker's export changes what a .pte holds
ROW_KEYS = ("engine", "threads", "load_s", "kernels", "prefill", "decode", "profile", "routing", "peak_rss_mb",
            "size", "rep", "decode_tokens", "loadavg", "engine_commit")


# ---- options (bad values raise cli.BadInput: one line, exit 2) ----------------------------------------------
def parse_ints(opt: str, spec: str, lo: int) -> list[int]:
    try:
        xs = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise cli.BadInput(f"{opt}: expected comma-separated integers, got {spec!r}") from None
    if not xs or min(xs) < lo:
        raise cli.BadInput(f"{opt}: expected integers >= {lo}, got {spec!r}")
    if len(set(xs)) != len(xs):
        raise cli.BadInput(f"{opt}: repeated value in {spec!r}")
    return xs


def build_parser():
    p = cli.parser("python -m bench.executorch_peer", __doc__)
    p.add_argument("--sizes", default="dense-1B,S", help="comma-separated presets (model/config.py)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured separately")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="interleaved repeats per (size, threads)")
    p.add_argument("--prompts", default="128,512", help="prompt lengths whose prefill is timed")
    p.add_argument("--decode-tokens", type=cli.positive_int, default=128, help="tokens decoded from context 0")
    p.add_argument("--max-ctx", type=cli.positive_int, default=1024, help="ExecuTorch's static KV cache length")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {cli.choices(ENGINES)}")
    p.add_argument("--native-attempt", type=cli.one_of(("on", "off")), default="on",
                   help="for MoE sizes, first try exporting MobileMoE.forward itself and record where it fails")
    p.add_argument("--work", default="/tmp/mmoe-bench", help="where the model files go (GBs; not the repo)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where executorch.md / _raw.json go")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="random-weight and token-id seed")
    p.add_argument("--et-python", default=str(ET_PYTHON), help="the executorch venv's python")
    p.add_argument("--timeout", type=cli.positive_float, default=3600, help="seconds per worker process")
    return p


def options(a) -> dict:
    from model.config import PRESETS  # noqa: PLC0415

    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in PRESETS]
    if bad or not sizes:
        raise cli.BadInput(f"--sizes: unknown size(s) {bad or a.sizes!r}; choose from {sorted(PRESETS)}")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise cli.BadInput(f"--engines: choose from {cli.choices(ENGINES)}, got {a.engines!r}")
    o = dict(sizes=sizes, engines=engines, threads=parse_ints("--threads", a.threads, 1),
             prompts=parse_ints("--prompts", a.prompts, 1), decode_tokens=a.decode_tokens, max_ctx=a.max_ctx,
             repeats=a.repeats, native=a.native_attempt == "on", seed=a.seed, et_python=a.et_python)
    # the ExecuTorch cache must hold the longest prompt and the decode; the prefill dimension is exported up to
    # the longest prompt
    if max(max(o["prompts"]), o["decode_tokens"] + 1) > a.max_ctx:
        raise cli.BadInput(f"--max-ctx {a.max_ctx}: must hold the longest prompt and --decode-tokens + 1")
    if "executorch" in engines and not Path(a.et_python).is_file():
        raise cli.BadInput(f"{a.et_python} not found: make the executorch venv first (make bench-executorch)")
    if "ours" in engines:
        from bench.mobile_runners import LIB  # noqa: PLC0415

        if not LIB.is_file():
            raise cli.BadInput(f"{LIB} not found: build the engine first (make mobile)")
    return o


def worker_plan(o: dict, vocab: int, rep: int) -> dict:
    """The plan both engines' workers take (bench.mobile_driver.worker's keys): decode from context 0 only."""
    return dict(prompts=o["prompts"], decode_contexts=[0], decode_tokens=o["decode_tokens"], id_range=[0, vocab],
                seed=o["seed"] + rep)


def check_row(row: dict, engine: str, prompts: list[int]) -> dict:
    """A worker's JSON row, or RuntimeError naming what is missing (a worker that printed something else)."""
    missing = [k for k in ("engine", "threads", "prefill", "decode", "peak_rss_mb") if k not in row]
    if missing:
        raise RuntimeError(f"{engine} worker row lacks {missing}")
    if row["engine"] != engine:
        raise RuntimeError(f"{engine} worker row says engine {row['engine']!r}")
    absent = [p for p in prompts if str(p) not in row["prefill"]] + (["decode 0"] if "0" not in row["decode"] else [])
    if absent:
        raise RuntimeError(f"{engine} worker row has no timing for {absent}")
    row.setdefault("profile", {})
    row.setdefault("routing", {"prefill": {}, "decode": {}})
    row.setdefault("kernels", "")
    return row


# ---- exports ------------------------------------------------------------------------------------------------
def export_record(stdout: str, rc: int, stderr_tail: str) -> dict:
    """The worker's export JSON line; a worker that died without one (killed for memory, a crash in native code)
    becomes a failure record naming the exit status and its last stderr line, never an exception."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "ok" in rec:
            return rec
    tail = stderr_tail.strip().splitlines()[-1:] or ["(no output)"]
    return dict(ok=False, failed_step="worker process", error=f"exit status {rc}; last stderr line: {tail[0][:400]}",
                steps={})


def pte_path(size: str, form: str, work: Path) -> Path:
    return work / f"{size}-random-8da4w-{form}.pte"


def export_pte(o: dict, size: str, form: str, work: Path, log, timeout: float) -> dict:
    """Export (or reuse, by stamp) one .pte; returns the export record (ok or the failure)."""
    out = pte_path(size, form, work)
    stamp = out.with_suffix(".stamp.json")
    want = dict(size=size, seed=o["seed"], form=form, max_ctx=o["max_ctx"], max_prefill=max(o["prompts"]),
                format=EXPORT_FORMAT)
    try:
        old = json.loads(stamp.read_text())
    except (OSError, ValueError):
        old = None
    if old and old.get("want") == want and (out.is_file() or not old["record"].get("ok")):
        log(f"  {size} {form}: reusing the export record of {stamp.name}")
        return old["record"]
    cmd = [o["et_python"], str(WORKER), "export", "--size", size, "--seed", str(o["seed"]), "--max-ctx",
           str(o["max_ctx"]), "--max-prefill", str(max(o["prompts"])), "--form", form, "--out", str(out)]
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        rec = export_record(p.stdout, p.returncode, p.stderr)
    except subprocess.TimeoutExpired:
        rec = dict(ok=False, failed_step="worker process", error=f"timed out after {timeout:.0f} s", steps={})
    rec["wall_s"] = round(time.time() - t, 1)
    log(f"  {size} {form}: " + (f"exported {out.name} ({rec.get('pte_bytes', 0) / 1e6:.0f} MB) in {rec['wall_s']} s"
                                if rec.get("ok") else f"FAILED at {rec.get('failed_step')}: {rec.get('error')}"))
    atomic_write(stamp, json.dumps(dict(want=want, record=rec)))
    return rec


# ---- the interleaved loop ------------------------------------------------------------------------------------
def worker_cmd(engine: str, o: dict, model: Path, threads: int, plan: dict) -> list[str]:
    if engine == "ours":
        return [sys.executable, "-m", "bench.mobile", "worker", "--engine", "ours", "--model", str(model),
                "--threads", str(threads), "--plan", json.dumps(plan)]
    return [o["et_python"], str(WORKER), "time", "--pte", str(model), "--threads", str(threads),
            "--plan", json.dumps(plan)]


def run_matrix(o: dict, models: dict, log, timeout: float, run=run_cmd, on_row=None) -> list[dict]:
    """models: {size: {engine: path}} (an engine absent for a size is skipped: its export failed)."""
    from model.config import get_config  # noqa: PLC0415

    commit = engine_commit()
    rows: list[dict] = []
    for rep in range(o["repeats"]):
        for s in o["sizes"]:
            plan = worker_plan(o, get_config(s).vocab_size, rep)
            for t in o["threads"]:
                order = o["engines"] if rep % 2 == 0 else list(reversed(o["engines"]))
                for e in order:
                    if e not in models.get(s, {}):
                        continue
                    t0 = time.time()
                    out = run(worker_cmd(e, o, models[s][e], t, plan), timeout=timeout)
                    row = check_row(json.loads(out.strip().splitlines()[-1]), e, o["prompts"])
                    row.update(size=s, rep=rep, decode_tokens=o["decode_tokens"], loadavg=loadavg(),
                               engine_commit=commit)
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    pl = max(o["prompts"])
                    log(f"  rep {rep} {s:>8} t{t} {e:>10}: prefill{pl} {pl / row['prefill'][str(pl)]:7.1f} tok/s  "
                        f"decode {o['decode_tokens'] / row['decode']['0']:6.2f} tok/s  rss {row['peak_rss_mb']:.0f} MB"
                        f"  ({time.time() - t0:.0f} s, load {loadavg()})")
    return rows


# ---- report --------------------------------------------------------------------------------------------------
def _f(x: float, nd: int = 1) -> str:
    return "—" if x != x else f"{x:.{nd}f}"


def summarize(rows: list[dict], sizes, threads, prompts) -> dict:
    """{(size, threads, engine): {metric: median}} and {(size, threads): {metric: median of ours_i / et_i}}."""
    from bench.mobile_stats import _med, _tps  # noqa: PLC0415

    metrics = [("prefill", str(p)) for p in prompts] + [("decode", "0")]
    by: dict = {}
    for r in rows:
        by.setdefault((r["size"], r["threads"], r["engine"]), {})[r["rep"]] = r
    med, ratio = {}, {}
    for key, reps in by.items():
        med[key] = {f"{k} {n}": _med([_tps(r, k, n) for r in reps.values()]) for k, n in metrics}
        med[key]["rss"] = _med([r["peak_rss_mb"] for r in reps.values()])
        med[key]["repeats"] = len(reps)
    for s in sizes:
        for t in threads:
            a, b = by.get((s, t, "ours"), {}), by.get((s, t, "executorch"), {})
            ratio[(s, t)] = {f"{k} {n}": _med([_tps(a[i], k, n) / _tps(b[i], k, n) for i in a if i in b])
                             for k, n in metrics}
    return dict(med=med, ratio=ratio)


def report_text(o: dict, rows: list[dict], exports: dict, info: dict, versions: dict, started: str,
                elapsed: float, load: tuple[str, str]) -> str:
    sizes, threads, prompts = o["sizes"], o["threads"], o["prompts"]
    sm = summarize(rows, sizes, threads, prompts)
    from bench.machine import describe_commit  # noqa: PLC0415

    commits = []
    for r in rows:
        if r.get("engine_commit") not in commits:
            commits.append(r.get("engine_commit"))
    L = ["# ExecuTorch (XNNPACK, 8da4w) as a second peer of our phone engine\n"]
    L.append(f"Generated by `python -m bench.executorch_peer` ({' '.join(sys.argv[1:]) or 'defaults'}) on {started} "
             f"in {elapsed / 60:.1f} min. **Random weights** (model/init.py \"balanced\", seed {o['seed']}) with the "
             "real preset shapes; both engines' weights come from the same random INT4 codes.\n")
    L.append("Engine commit(s): " + "; ".join(describe_commit(c) for c in commits or [None]) + "\n")
    L.append("## Machine and versions\n")
    L.append(f"- CPU: {info.get('cpu', '?')} ({info.get('cpus')} logical CPUs), RAM {info.get('mem_gb', '?')} GB; "
             f"SIMD flags: {', '.join(info.get('flags', []))}")
    L.append(f"- Load average (1/5/15 min) at start: {load[0]}; at end: {load[1]} (a shared machine: absolute "
             "numbers are noisy, the interleaved pair-by-pair ratios less so)")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    L.append("")
    L.append("## Method\n")
    L.append("Every measurement is a fresh process: ours = `python -m bench.mobile worker --engine ours` on the "
             ".mmoe of `mobile export --random-init` (mobile/engine.py, INT4 g32 weights, fp32 router/norms, fp16 KV "
             "cache); ExecuTorch = bench/executorch_worker.py in bench/.venv-executorch, the .pte loaded with "
             "`portable_lib._load_for_executorch` and its threadpool set with `_unsafe_reset_threadpool(threads)`. "
             f"Each worker: one-token warm-up, prefill of {' and '.join(map(str, prompts))} random ids from an "
             f"empty cache (one forward each), then {o['decode_tokens']} single-token forwards from context 0 "
             "(teacher-forced random ids, seed = run seed + repeat). Engines alternate their order every repeat; "
             f"{o['repeats']} repeats; medians; ours/ExecuTorch ratios pair by pair (same repeat), then the median. "
             "Peak RSS = the worker's VmHWM (Python interpreter and, for ExecuTorch, torch's import included).\n")
    L.append("ExecuTorch model: MobileMoE with the same weights (dequantized INT4 codes), as "
             f"bench/executorch_model.KVCacheLM: fp32 static KV cache of {o['max_ctx']} positions written at "
             "input_pos (the llama example's mutable-buffer cache), attention = SDPA over the whole cache with a "
             "causal mask, GQA by repeating K/V heads, logits of the last token only; the LM head is its own "
             "linear (the phone engine's tied table is one INT4 copy, the .pte holds two: INT4 embedding + INT4 "
             "head). Quantized with torchao's Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)) on every "
             "linear but the router (the llama example's 8da4w -G 32) and IntxWeightOnlyConfig(int4, PerGroup(32)) "
             "on the embedding; torch.export with a dynamic token dimension; to_edge_transform_and_lower with "
             "XnnpackPartitioner; to_executorch.\n")
    L.append("## Exports\n")
    L.append("| model | form | result | steps (s) | .pte | ops left outside XNNPACK |")
    L.append("|---|---|---|---|---|---|")
    for (s, form), rec in exports.items():
        steps = ", ".join(f"{k} {v}" for k, v in rec.get("steps", {}).items()) or "—"
        res = "ok" if rec.get("ok") else f"**failed at {rec.get('failed_step')}**: `{rec.get('error', '')}`"
        pte = f"{rec['pte_bytes'] / 1e6:.0f} MB" if rec.get("pte_bytes") else "—"
        ops = ", ".join(f"{k.split('.')[-2] if k.count('.') >= 2 else k} x{v}"
                        for k, v in list(rec.get("ops_outside_xnnpack", {}).items())[:8]) or "—"
        L.append(f"| {s} | {form} | {res} | {steps} | {pte} | {ops} |")
    L.append("")
    if any(form == "native" for _, form in exports):
        L.append("`native` = MobileMoE.forward exported as it is (no KV cache; routed experts through kernels.moe, "
                 "which under export is the opaque custom op mobilemoe::moe_experts). `kvcache` = KVCacheLM; for MoE "
                 "sizes its experts are the **dense-compute formulation**: every token runs all E experts as two "
                 "fused INT4 linears (D -> E*2F, E*F -> D) and the non-selected experts are gated to 0. The routing "
                 "is the model's, but expert FLOPs and bytes are E/k times the sparse engine's: the MoE rows below "
                 "measure ExecuTorch *without* expert sparsity.\n")
    L.append("## Results (median tokens/s)\n")
    hdr = ["model", "threads", "engine", "repeats"] + [f"prefill {p}" for p in prompts] + ["decode @ctx 0",
                                                                                          "peak RSS MB"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for s in sizes:
        for t in threads:
            for e in o["engines"]:
                m = sm["med"].get((s, t, e))
                if m is None:
                    L.append(f"| {s} | {t} | {e} | 0 | " + " | ".join(["—"] * (len(prompts) + 2)) + " |")
                    continue
                L.append(f"| {s} | {t} | {e} | {m['repeats']} | " + " | ".join(
                    _f(m[f"prefill {p}"]) for p in prompts) + f" | {_f(m['decode 0'], 2)} | {_f(m['rss'], 0)} |")
    L.append("")
    if "ours" in o["engines"] and "executorch" in o["engines"]:
        L.append("## Ours / ExecuTorch (pair-by-pair median; > 1: ours faster)\n")
        L.append("| model | threads | " + " | ".join(f"prefill {p}" for p in prompts) + " | decode @ctx 0 |")
        L.append("|---|---|" + "---|" * (len(prompts) + 1))
        for s in sizes:
            for t in threads:
                r = sm["ratio"][(s, t)]
                L.append(f"| {s} | {t} | " + " | ".join(_f(r[f"prefill {p}"], 2) for p in prompts)
                         + f" | {_f(r['decode 0'], 2)} |")
        L.append("")
    L.append("Raw rows: executorch_raw.json (bench.mobile's row keys; engine \"ours\" / \"executorch\").\n")
    return "\n".join(L)


def et_versions(et_python: str) -> dict:
    """executorch / torchao / torch versions as the executorch venv sees them (that venv's python prints them)."""
    code = ("import importlib.metadata as m, json, torch; print(json.dumps({'executorch': m.version('executorch'), "
            "'torchao': m.version('torchao'), 'torch': torch.__version__}))")
    try:
        return json.loads(run_cmd([et_python, "-c", code]).strip().splitlines()[-1])
    except (RuntimeError, OSError, ValueError) as e:
        return dict(executorch=f"unavailable ({cli.one_line(e)})")


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    o = options(a)
    from bench import mobile_driver  # noqa: PLC0415
    from model.config import get_config  # noqa: PLC0415

    def log(msg):
        print(msg, flush=True)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start, load_start = time.time(), loadavg()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "executorch_rows.partial.json"
    exports: dict = {}
    models: dict = {s: {} for s in o["sizes"]}
    try:
        if "ours" in o["engines"]:
            log(f"[executorch_peer] .mmoe models in {work}")
            mm = mobile_driver.prepare_models(o["sizes"], work, o["seed"], log, gguf=False)
            for s in o["sizes"]:
                models[s]["ours"] = mm[s]["ours"]
        if "executorch" in o["engines"]:
            log("[executorch_peer] ExecuTorch exports (one at a time: the 1B models need GBs)")
            work.mkdir(parents=True, exist_ok=True)
            for s in o["sizes"]:
                if o["native"] and get_config(s).is_moe:
                    exports[(s, "native")] = export_pte(o, s, "native", work, log, a.timeout)
                rec = exports[(s, "kvcache")] = export_pte(o, s, "kvcache", work, log, a.timeout)
                if rec.get("ok"):
                    models[s]["executorch"] = pte_path(s, "kvcache", work)
        log(f"[executorch_peer] measuring {o['sizes']} x threads {o['threads']} x {o['engines']}")
        rows = run_matrix(o, models, log, a.timeout, on_row=lambda rs: atomic_write(partial, json.dumps(rs)))
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    info = machine_info()
    versions = dict(et_versions(o["et_python"]) if "executorch" in o["engines"] else {},
                    **{k: v for k, v in info.get("versions", {}).items() if k in ("gcc", "git")})
    md = report_text(o, rows, exports, info, versions, started, time.time() - t_start, (load_start, loadavg()))
    atomic_write(out / "executorch.md", md)
    raw = dict(info=info, versions=versions, rows=rows, sizes=o["sizes"], threads=o["threads"],
               engines=o["engines"], repeats={s: o["repeats"] for s in o["sizes"]},
               decode_tokens={s: o["decode_tokens"] for s in o["sizes"]}, max_ctx=o["max_ctx"],
               exports=[{**rec, "size": s, "form": f} for (s, f), rec in exports.items()])
    atomic_write(out / "executorch_raw.json", json.dumps(raw, indent=1))
    partial.unlink(missing_ok=True)
    log(f"[executorch_peer] wrote {out / 'executorch.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
