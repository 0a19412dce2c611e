"""Phone-engine benchmark: our INT4 engine vs llama.cpp (same model as GGUF Q4_0), MoE vs dense, roofline.

    python -m bench.mobile [--sizes S,dense-1B,M,L] [--threads 1,2] [--repeats 5]
                           [--trained auto|none|PATH.mmoe,...] [--work /tmp/mmoe-bench] [--out bench/results]

Models are RANDOM-WEIGHT models with the real S / M / L / dense-1B shapes (speed does not depend on the
values). They use model/init.py's balanced random init, so every MoE layer routes to all its experts, the
balanced case training aims for; the report prints the routing our engine counted (distinct experts per layer,
max / mean expert load) for every timed phase, so each figure names the regime it was measured in. Our
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
profiled with the engine's per-op timers (mmoe_profile_get). The report's header names the engine commit
(HEAD, and whether mobile/c had uncommitted changes).

Trained checkpoints (--trained; by default runs/tiny/model.mmoe, the `make train` model, when it exists) are
timed the same way by both engines (GGUF by `--from-mmoe`), but fed the ids of real held-out text (the
held-out Shakespeare plays of data/shakespeare, else data/corpus's held-out documents, or --trained-text) encoded
by the tokenizer.json beside the .mmoe, so their routing statistics are the trained router's on real text; the
prompts and contexts past such a model's context are skipped and listed. The report also summarises the peers'
own runs: the llama-bench cross-check (bench/results/llama_bench_raw.json, `make bench-llama`) and ExecuTorch
(executorch_raw.json, `make bench-executorch`), each with its own date and commit; and the issue's goals table
for S / M / L (reported, never asserted), with a "why from the profile" line for each missed goal.

Writes <out>/mobile.md, <out>/mobile_{decode,prefill,roofline,profile}.png and <out>/mobile_raw.json.

The code: bench/mobile_runners.py (the two engines), bench/machine.py (CPU facts, STREAM, engine commit),
bench/mobile_driver.py (model files, workers, the repeat loop), bench/mobile_stats.py (medians, pair-by-pair
ratios, routing), bench/mobile_plots.py, bench/mobile_report.py (markdown); this file is the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import mobile_driver as driver
from bench.machine import engine_commit, loadavg, machine_info, stream_bandwidth
from bench.mobile_plots import write_plots
from bench.mobile_report import report_text
from bench.mobile_runners import ENGINES, LIB, MAX_CTX
from bench.mobile_stats import aggregate
from model import cli
from model.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]
ALL_SIZES = ("S", "dense-1B", "M", "L")


# ---- option parsing (bad values raise cli.BadInput: one line, exit 2) -------------------------------------
def _ints(opt: str, spec: str, lo: int) -> list[int]:
    try:
        xs = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise cli.BadInput(f"{opt}: expected comma-separated integers, got {spec!r}") from None
    if not xs or min(xs) < lo:
        raise cli.BadInput(f"{opt}: expected integers >= {lo}, got {spec!r}")
    return xs


def _size_ints(opt: str, spec: str, sizes: list[str]) -> dict[str, int]:
    out = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in sizes:
            raise cli.BadInput(f"{opt}: expected SIZE=N,... with SIZE one of --sizes ({cli.choices(sizes)}), "
                               f"got {part!r}")
        try:
            out[k] = int(v)
        except ValueError:
            raise cli.BadInput(f"{opt}: expected an integer after {k}=, got {v!r}") from None
        if out[k] < 1:
            raise cli.BadInput(f"{opt}: {k} must be >= 1, got {out[k]}")
    return out


def parse_repeats(spec: str, sizes: list[str]) -> dict[str, int]:
    """'N' for every size, or 'SIZE=N,...' (sizes not named get the smallest N given)."""
    if "=" not in spec:
        xs = _ints("--repeats", spec, 1)
        if len(xs) != 1:
            raise cli.BadInput(f"--repeats: expected N or SIZE=N,..., got {spec!r}")
        return dict.fromkeys(sizes, xs[0])
    out = _size_ints("--repeats", spec, sizes)
    for s in sizes:
        out.setdefault(s, min(out.values()))
    return out


def parse_kv_ints(spec: str, sizes: list[str], default: int) -> dict[str, int]:
    out = dict.fromkeys(sizes, default)
    if spec:
        out.update(_size_ints("--decode-tokens-by-size", spec, sizes))
    return out


def build_parser():
    p = cli.parser("python -m bench.mobile", __doc__)
    p.add_argument("--sizes", default=",".join(ALL_SIZES), help="comma-separated presets (model/config.py; "
                   "tiny: smoke runs only)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured separately")
    p.add_argument("--repeats", default="5", help="N (>= 5 for the report the issue asks for), or SIZE=N,...")
    p.add_argument("--prompts", default="128,512", help="prompt lengths whose prefill is timed")
    p.add_argument("--decode-contexts", default="0,1024", help="cache lengths the decode is timed at")
    p.add_argument("--decode-tokens", type=cli.positive_int, default=128, help="tokens decoded per context")
    p.add_argument("--decode-tokens-by-size", default="", help="override --decode-tokens per size, e.g. L=32 (default: none)%(default)s")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {cli.choices(ENGINES)}")
    p.add_argument("--work", default="/tmp/mmoe-bench", help="where the model files go (GBs; not the repo)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the report, plots and raw "
                   "rows go")
    p.add_argument("--trained", default="auto", help="trained .mmoe checkpoints to time too, comma-separated (each "
                   "with its tokenizer.json beside it); auto: runs/tiny/model.mmoe (`make train`) when it exists; "
                   "none: no trained rows")
    p.add_argument("--trained-text", default="", help="UTF-8 text file fed to the trained rows instead of the "
                   "held-out Shakespeare plays of data/shakespeare (else data/corpus's held-out documents) "
                   "(default: none)%(default)s")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="random-weight and token-id seed")
    p.add_argument("--timeout", type=cli.positive_float, default=1800, help="seconds per worker process")
    # the lower bounds are bench/stream.c's own
    p.add_argument("--stream-mib", type=cli.int_range(8), default=256,
                   help="MiB per STREAM triad array (3 arrays; must dwarf the last-level cache)")
    p.add_argument("--stream-repeats", type=cli.int_range(2), default=20, help="STREAM passes (best is reported)")
    p.add_argument("--from-raw", default="", help="rebuild the report from saved worker rows "
                   "(mobile_rows.partial.json of an interrupted run, or mobile_raw.json) instead of measuring; STREAM "
                   "is re-measured if absent (default: none)%(default)s")
    return p


def worker_main(argv: list[str]) -> int:
    p = cli.parser("python -m bench.mobile worker", "one measurement (started by the driver): prints one JSON line")
    p.add_argument("--engine", choices=ENGINES, required=True, help="which engine runs the model")
    p.add_argument("--model", required=True, help="the model file that engine runs")
    p.add_argument("--threads", type=cli.positive_int, required=True, help="engine threads")
    p.add_argument("--plan", required=True, help="JSON: prompts, decode_contexts, decode_tokens, id_range, seed")
    a = p.parse_args(argv)
    try:
        print(json.dumps(driver.worker(a.engine, a.model, a.threads, json.loads(a.plan))))
    except (RuntimeError, OSError, ValueError) as e:  # the driver shows this line as the worker's failure
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _options(a) -> dict:
    """The validated run options, or cli.BadInput naming the option at fault."""
    from model.config import PRESETS, get_config  # noqa: PLC0415

    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in PRESETS]
    if bad or not sizes:
        raise cli.BadInput(f"unknown size(s) {bad or a.sizes!r}; choose from {sorted(PRESETS)} "
                           "(tiny: smoke runs only)")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise cli.BadInput(f"--engines: choose from {cli.choices(ENGINES)}, got {a.engines!r}")
    o = dict(sizes=sizes, engines=engines, threads=_ints("--threads", a.threads, 1),
             prompts=_ints("--prompts", a.prompts, 1), contexts=_ints("--decode-contexts", a.decode_contexts, 0),
             repeats=parse_repeats(a.repeats, sizes),
             decode_tokens=parse_kv_ints(a.decode_tokens_by_size, sizes, a.decode_tokens))
    for s in sizes:  # the engines' context is MAX_CTX, our engine's also capped at the model's max_seq_len
        limit = min(MAX_CTX, get_config(s).max_seq_len)
        if max(o["prompts"] + [c + o["decode_tokens"][s] + 1 for c in o["contexts"]]) > limit:
            raise cli.BadInput(f"prompts / context + decode tokens must fit the {limit}-token context of {s}")
    o["trained"], o["trained_note"] = _trained_paths(a.trained)
    if a.trained_text and not Path(a.trained_text).is_file():
        raise cli.BadInput(f"--trained-text {a.trained_text}: no such file")
    if "ours" in engines and not LIB.is_file():
        raise cli.BadInput(f"{LIB} not found: build the engine first (make mobile)")
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401, PLC0415
        except ImportError:
            raise cli.BadInput("llama-cpp-python is not installed (pip install -c constraints-cpu.txt -e "
                               "'.[bench]')") from None
    return o


DEFAULT_TRAINED = REPO / "runs" / "tiny" / "model.mmoe"


def _trained_paths(spec: str) -> tuple[list[Path], str]:
    """(the trained .mmoe files to time, why there are none); cli.BadInput for a named file that is not usable."""
    spec = spec.strip()
    if spec == "none":
        return [], "none was asked for (--trained none)"
    if spec == "auto":
        if not DEFAULT_TRAINED.is_file():
            return [], (f"{DEFAULT_TRAINED.relative_to(REPO)} (the `make train` model, with its tokenizer.json) was "
                        "absent when this run started; `make train` makes it, then `make bench-mobile` times it")
        try:  # the default is best effort: an unusable one is reported, not an error of the run
            return _checked([DEFAULT_TRAINED]), ""
        except cli.BadInput as e:
            return [], f"{DEFAULT_TRAINED.relative_to(REPO)} is not usable ({e}); `make train` remakes it"
    else:
        paths = [Path(x.strip()) for x in spec.split(",") if x.strip()]
        if not paths:
            raise cli.BadInput(f"--trained: expected auto, none or comma-separated .mmoe paths, got {spec!r}")
    return _checked(paths), ""


def _checked(paths: list[Path]) -> list[Path]:
    for pth in paths:
        if not pth.is_file():
            raise cli.BadInput(f"--trained {pth}: no such file")
        if not (pth.parent / "tokenizer.json").is_file():
            raise cli.BadInput(f"--trained {pth}: no tokenizer.json beside it (the run's tokenizer encodes the text)")
        try:
            driver.mmoe_config(pth)
        except (ValueError, OSError) as e:
            raise cli.BadInput(f"--trained {pth}: {cli.one_line(e)}") from None
    return paths


def _load_raw(path: str, o: dict) -> tuple[list[dict], dict | None, dict | None]:
    """(rows, STREAM figures or None, machine info or None) of a saved run, keeping the rows the options select."""
    saved = json.loads(Path(path).read_text())
    bw = info = None
    if isinstance(saved, dict):  # a mobile_raw.json: rows, the STREAM figures and the machine of that run
        bw = {int(k): v for k, v in saved["stream"].items()}
        info = saved.get("info")
        saved = saved["rows"]
    rows = [r for r in saved if (r["size"] in o["sizes"] or r.get("trained")) and r["threads"] in o["threads"]
            and r["engine"] in o["engines"]]
    if not rows:
        raise cli.BadInput(f"{path}: no rows for sizes {o['sizes']}, threads {o['threads']}, engines {o['engines']}")
    if bw is not None and any(t not in bw for t in o["threads"]):
        bw = None  # that run did not measure every thread count asked for: measure STREAM again
    return rows, bw, info


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    a = build_parser().parse_args(argv)
    o = _options(a)
    sizes, threads, engines, prompts, contexts = (o[k] for k in ("sizes", "threads", "engines", "prompts",
                                                                 "contexts"))
    repeats, decode_tokens = o["repeats"], o["decode_tokens"]
    saved, saved_bw, saved_info = _load_raw(a.from_raw, o) if a.from_raw else (None, None, None)

    from model.config import ModelConfig, get_config, int4_weight_bytes  # noqa: PLC0415

    def log(msg):
        print(msg, flush=True)

    started = f"rows of {a.from_raw}" if a.from_raw else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start, load_start = time.time(), loadavg()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "mobile_rows.partial.json"
    trained_plans: dict = {}
    try:
        if saved is not None:
            models = {s: driver.model_paths(s, work) for s in sizes}
            for s in sizes:
                repeats[s] = len({r["rep"] for r in saved if r["size"] == s})
                decode_tokens[s] = next((r["decode_tokens"] for r in saved if r["size"] == s), decode_tokens[s])
        else:
            log(f"[bench.mobile] preparing models in {work}")
            models = driver.prepare_models(sizes, work, a.seed, log, gguf="llama.cpp" in engines)
            if o["trained"]:
                text = driver.heldout_text(REPO, a.trained_text)
                log(f"[bench.mobile] trained checkpoints {[str(x) for x in o['trained']]}: text {text[1]}")
                tmodels, trained_plans = driver.prepare_trained(
                    o["trained"], work, log, prompts, contexts, a.decode_tokens, text, MAX_CTX,
                    gguf="llama.cpp" in engines, taken=set(sizes))
                models.update(tmodels)
                for lab in tmodels:
                    repeats[lab], decode_tokens[lab] = max(repeats[s] for s in sizes), a.decode_tokens
        log("[bench.mobile] STREAM triad")
        bw = saved_bw or stream_bandwidth(threads, work, a.stream_mib, a.stream_repeats)
        for t in threads:
            log(f"  {t} thread(s): {bw[t]['best_gbs']:.1f} GB/s")
        plan = dict(prompts=prompts, decode_contexts=contexts, seed=a.seed)
        timed = sizes + list(trained_plans)
        log(f"[bench.mobile] measuring {timed} x threads {threads} x {engines}")
        if saved is not None:
            rows = saved
        else:
            # the partial rows survive an interrupted run (--from-raw rebuilds the report from them)
            rows = driver.run_matrix(models, timed, threads, repeats, plan, decode_tokens, engines, log, a.timeout,
                                     on_row=lambda rs: atomic_write(partial, json.dumps(rs)),
                                     commit=engine_commit(), trained=trained_plans)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    load_end = loadavg()
    info = saved_info or machine_info()  # a rebuilt report describes the machine that measured, not this one
    if saved is not None:  # and its load: the first and the last measured rows'
        load_start, load_end = rows[0].get("loadavg", "?"), rows[-1].get("loadavg", "?")
    commits = []
    for r in rows:  # distinct, in the order the rows were measured
        if r.get("engine_commit") not in commits:
            commits.append(r.get("engine_commit"))
    # the kernel sets that really ran (each worker reports its own), so the report names the dtypes' code path
    kernels = {e: sorted({str(r["kernels"]) for r in rows if r.get("engine") == e and r.get("kernels")})
               for e in engines}
    # the trained rows' labels and records come from the rows themselves, so --from-raw rebuilds them too
    trained = {}
    for r in rows:
        if r.get("trained") and r["size"] not in trained:
            trained[r["size"]] = r["trained"]
    trained_note = o["trained_note"] if saved is None else "the saved rows hold none"
    cfgs = {s: get_config(s) for s in sizes}
    for lab, m in trained.items():
        cfgs[lab] = ModelConfig.from_dict(m["config"])
        repeats[lab] = len({r["rep"] for r in rows if r["size"] == lab})
        decode_tokens[lab] = next(r["decode_tokens"] for r in rows if r["size"] == lab)
        models.setdefault(lab, {"ours": Path(m["source"]), "llama.cpp": Path(m.get("gguf", ""))})
    weight_bytes = {s: int4_weight_bytes(c)["total"] for s, c in cfgs.items()}
    read_bytes = {s: int4_weight_bytes(c)["read_per_token"] for s, c in cfgs.items()}
    file_bytes = {s: {e: models[s][e].stat().st_size if models[s][e].is_file() else float("nan") for e in ENGINES}
                  for s in cfgs}
    agg = aggregate(rows, sizes + list(trained), threads, engines, prompts, contexts, trained=set(trained))
    plots = write_plots(agg, sizes, threads, engines, bw, read_bytes, out)
    md = out / "mobile.md"
    atomic_write(md, report_text(agg, sizes, threads, engines, prompts, contexts, bw, info, repeats,
                                 decode_tokens, weight_bytes, read_bytes, file_bytes, plots, started,
                                 time.time() - t_start, load_start, load_end, commits=commits, trained=trained,
                                 trained_note=trained_note, kernels=kernels, peer_dirs=[out, REPO / "bench" / "results"]))
    raw = dict(info=info, stream=bw, rows=rows, sizes=sizes, threads=threads, engines=engines, repeats=repeats,
               decode_tokens=decode_tokens, read_bytes=read_bytes, weight_bytes=weight_bytes, engine_commits=commits,
               trained=trained, trained_note=trained_note)
    atomic_write(out / "mobile_raw.json", json.dumps(raw, indent=1))
    partial.unlink(missing_ok=True)  # the complete rows are in mobile_raw.json
    log(f"[bench.mobile] wrote {md} and {', '.join(plots)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
