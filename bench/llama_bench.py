"""Cross-check of the phone benchmark's llama.cpp numbers with llama.cpp's own `llama-bench`.

    python -m bench.llama_bench [--sizes S,dense-1B] [--threads 1,2] [--repeats 3] [--work /tmp/mmoe-bench]
                                [--llama-bench PATH] [--build-root ~/.cache/mobilemoe] [--out bench/results]

bench.mobile times llama.cpp through llama-cpp-python from a Python worker (bench/mobile_runners.py). So that
the ours / llama.cpp ratios do not rest on that driver, this runs, on the same GGUF files (bench.mobile's
random-weight models, converted by mobile/gguf_export.py --from-mmoe), in one interleaved run:

  llama-bench       llama.cpp's own benchmark binary, built from the llama.cpp that the installed
                    llama-cpp-python vendors (so both llama.cpp paths are the same source), CPU only,
                    -DGGML_NATIVE=ON, cached under --build-root;
  llama.cpp driver  bench.mobile's worker with llama-cpp-python;
  ours driver       bench.mobile's worker with our engine;

on four shapes: pp128 and pp512 (one batched prompt, empty cache), tg64 (64 single-token decodes from an empty
cache) and tg64 @ d1024 (the same after an untimed 1024-token prefill), at each thread count. llama-bench
gets the driver's batch sizes (-b 512 -ub 512) and otherwise its defaults (flash attention auto, F16 KV cache,
one warm-up run per test). One extra llama-bench test, tg64 @ d1024 with flash attention off, separates the
attention kernel from the rest when llama.cpp's decode slows down with depth. The three are interleaved, their
order reversed every repeat, and ratios are taken pair by pair (same repeat), then the median.

Writes <out>/llama_bench.md and <out>/llama_bench_raw.json. `make bench-llama` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import mobile_driver as driver
from bench.machine import describe_commit, engine_commit, loadavg, machine_info, run_cmd
from bench.mobile_runners import LIB
from model import cli
from model.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]
METHODS = ("llama-bench", "llama.cpp driver", "ours driver")
BATCH = 512  # the driver's n_batch = n_ubatch (bench/mobile_runners.py)


@dataclass(frozen=True)
class Shape:
    name: str
    n_prompt: int
    n_gen: int
    n_depth: int
    flash_attn: str = "auto"  # llama-bench's -fa; "auto" is both llama-bench's and llama-cpp-python's default

    @property
    def tokens(self) -> int:
        return self.n_prompt or self.n_gen

    def driver_key(self) -> tuple[str, str] | None:
        """Where bench.mobile's worker row holds the same measurement (None: llama-bench only)."""
        if self.flash_attn != "auto":
            return None
        return ("prefill", str(self.n_prompt)) if self.n_prompt else ("decode", str(self.n_depth))


SHAPES = (Shape("pp128", 128, 0, 0), Shape("pp512", 512, 0, 0), Shape("tg64", 0, 64, 0),
          Shape("tg64@d1024", 0, 64, 1024))
FA_OFF = Shape("tg64@d1024 fa=off", 0, 64, 1024, flash_attn="off")


# ---- building / locating the binary ---------------------------------------------------------------------------
def llama_cpp_python_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise cli.BadInput("llama-cpp-python is not installed (pip install -c constraints-cpu.txt -e '.[bench]'): "
                           "llama-bench is built from the llama.cpp it vendors") from None


def binary_path(build_root: Path, version: str) -> Path:
    return build_root / f"llama.cpp-{version}" / "build" / "bin" / "llama-bench"


def missing_build_tools(which=shutil.which) -> list[str]:
    missing = [] if which("cmake") else ["cmake"]
    cxx = os.environ.get("CXX")
    if not (which(cxx) if cxx else any(which(c) for c in ("c++", "g++", "clang++"))):
        missing.append(f"a C++ compiler ({cxx or 'c++ / g++ / clang++'})")
    return missing


def configure_cmd(src: Path, build: Path, version: str) -> list[str]:
    """CPU only, the host's SIMD (as the Makefile builds llama-cpp-python), shared libllama / libggml like the
    ones llama-cpp-python ships (so they can stand in for them: LLAMA_CPP_LIB_PATH), nothing beyond the tools."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
            "-DGGML_CUDA=OFF", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_TOOLS=ON", f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{version}"]


def locate_or_build(build_root: Path, version: str, log, exe: str = "", which=shutil.which) -> Path:
    """The llama-bench binary: `exe` if given, else the cached build for `version`, else built now (~5 min on
    2 cores) from the llama-cpp-python sdist of that version (pip download: a package registry)."""
    if exe:
        p = Path(exe)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise cli.BadInput(f"--llama-bench {exe}: not an executable file")
        return p
    out = binary_path(build_root, version)
    if out.is_file():
        return out
    missing = missing_build_tools(which)
    if missing:
        raise cli.BadInput(f"cannot build llama-bench: {' and '.join(missing)} not found on PATH (install them, "
                           "or pass --llama-bench PATH)")
    top = out.parents[2]
    top.mkdir(parents=True, exist_ok=True)
    sdist = top / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log(f"  downloading the llama-cpp-python {version} sdist (it vendors llama.cpp)")
        run_cmd([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                 "--no-binary", ":all:", "-d", str(top)], timeout=1800)
    src_top = top / "src"
    src = src_top / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(src_top, filter="data")
    build = out.parents[1]
    log(f"  building llama-bench in {build} (-DGGML_NATIVE=ON, CPU only, -j2)")
    run_cmd(configure_cmd(src, build, version), timeout=1800)
    run_cmd(["cmake", "--build", str(build), "--target", "llama-bench", "-j2"], timeout=3600)
    if not out.is_file():
        raise RuntimeError(f"the llama-bench build finished but {out} is missing")
    return out


# ---- running llama-bench --------------------------------------------------------------------------------------
def bench_cmd(exe: Path, model: Path, threads: int, shape: Shape, reps: int) -> list[str]:
    return [str(exe), "-m", str(model), "-t", str(threads), "-p", str(shape.n_prompt), "-n", str(shape.n_gen),
            "-d", str(shape.n_depth), "-b", str(BATCH), "-ub", str(BATCH), "-fa", shape.flash_attn,
            "-r", str(reps), "-o", "json"]


def parse_bench_json(text: str) -> list[dict]:
    """llama-bench -o json (an array, one object per test) -> [{n_prompt, n_gen, n_depth, threads, flash_attn,
    samples_ts, avg_ts, build_commit, model_type}]; ValueError naming what is wrong otherwise."""
    try:
        tests = json.loads(text)
    except ValueError as e:
        raise ValueError(f"llama-bench output is not JSON ({e}): {text.strip()[:80]!r}") from None
    if not isinstance(tests, list) or not tests:
        raise ValueError("llama-bench output: expected a non-empty JSON array of tests")
    out = []
    for t in tests:
        try:
            samples = [float(x) for x in t["samples_ts"]]
            row = dict(n_prompt=int(t["n_prompt"]), n_gen=int(t["n_gen"]), n_depth=int(t.get("n_depth", 0)),
                       threads=int(t["n_threads"]), flash_attn=t.get("flash_attn"), samples_ts=samples,
                       avg_ts=float(t["avg_ts"]), build_commit=str(t.get("build_commit", "?")),
                       model_type=str(t.get("model_type", "?")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"llama-bench output: a test lacks a usable {e} field") from None
        if not samples:
            raise ValueError("llama-bench output: a test has no samples")
        out.append(row)
    return out


def run_llama_bench(exe: Path, model: Path, threads: int, shape: Shape, reps: int, timeout: float) -> dict:
    tests = parse_bench_json(run_cmd(bench_cmd(exe, model, threads, shape, reps), timeout=timeout))
    t = tests[0]
    if (t["n_prompt"], t["n_gen"], t["n_depth"], t["threads"]) != (shape.n_prompt, shape.n_gen, shape.n_depth,
                                                                   threads):
        raise RuntimeError(f"llama-bench ran {t} for {shape.name} at {threads} threads")
    return t


# ---- the interleaved run -------------------------------------------------------------------------------------
def driver_plan(vocab: int, seed: int) -> dict:
    prompts = sorted({s.n_prompt for s in SHAPES if s.n_prompt})
    ctxs = sorted({s.n_depth for s in SHAPES if s.n_gen})
    n_gen = {s.n_gen for s in SHAPES if s.n_gen}
    assert len(n_gen) == 1, "the driver decodes one token count per run"
    return dict(prompts=prompts, decode_contexts=ctxs, decode_tokens=n_gen.pop(), id_range=[0, vocab], seed=seed)


def driver_tps(res: dict, shape: Shape) -> float:
    """tok/s of a bench.mobile worker's JSON line (seconds per prefill / per decode context) for one shape."""
    kind, key = shape.driver_key()
    n = shape.n_prompt if kind == "prefill" else shape.n_gen
    v = res[kind].get(key)
    return n / v if v else float("nan")


def run_matrix(models: dict, sizes: list[str], threads: list[int], repeats: int, exe: Path, bench_reps: int,
               seed: int, timeout: float, log, fa_check: bool = True) -> list[dict]:
    """One row per (repeat, size, threads, method): {tps: {shape name: tokens/s}}; methods in alternating order."""
    from model.config import get_config  # noqa: PLC0415

    shapes = SHAPES + ((FA_OFF,) if fa_check else ())
    rows = []
    for rep in range(repeats):
        for s in sizes:
            plan = driver_plan(get_config(s).vocab_size, seed + rep)
            for t in threads:
                order = METHODS if rep % 2 == 0 else tuple(reversed(METHODS))
                for m in order:
                    t0 = time.time()
                    row = dict(size=s, threads=t, rep=rep, method=m, loadavg_start=loadavg(), tps={}, samples={})
                    if m == "llama-bench":
                        for sh in shapes:
                            r = run_llama_bench(exe, models[s]["llama.cpp"], t, sh, bench_reps, timeout)
                            row["tps"][sh.name] = statistics.median(r["samples_ts"])
                            row["samples"][sh.name] = r["samples_ts"]
                            row["build_commit"], row["model_type"] = r["build_commit"], r["model_type"]
                    else:
                        eng = "ours" if m == "ours driver" else "llama.cpp"
                        cmd = [sys.executable, "-m", "bench.mobile", "worker", "--engine", eng, "--model",
                               str(models[s][eng]), "--threads", str(t), "--plan", json.dumps(plan)]
                        res = json.loads(run_cmd(cmd, timeout=timeout).strip().splitlines()[-1])
                        row["tps"] = {sh.name: driver_tps(res, sh) for sh in SHAPES}
                    row["loadavg_end"] = loadavg()
                    rows.append(row)
                    log(f"  rep {rep} {s:>8} t{t} {m:>16}: " + "  ".join(f"{k} {v:.1f}" for k, v in row["tps"].items())
                        + f"  ({time.time() - t0:.0f} s, load {row['loadavg_end']})")
    return rows


def _med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def aggregate(rows: list[dict]) -> tuple[dict, dict]:
    """(medians {(size, threads, method, shape): tok/s}, pair-by-pair median ratios {(size, threads, shape,
    "a/b"): x}) with a, b among lb (llama-bench), drv (llama.cpp driver), ours."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["size"], r["threads"], r["method"]), {})[r["rep"]] = r["tps"]
    med = {}
    for (s, t, m), reps in by.items():
        for name in {k for v in reps.values() for k in v}:
            med[(s, t, m, name)] = _med([v.get(name, float("nan")) for v in reps.values()])
    short = dict(zip(METHODS, ("lb", "drv", "ours")))
    pairs = (("ours driver", "llama-bench"), ("ours driver", "llama.cpp driver"), ("llama.cpp driver", "llama-bench"))
    ratio = {}
    for s, t in {(k[0], k[1]) for k in by}:
        for a, b in pairs:
            ra, rb = by.get((s, t, a), {}), by.get((s, t, b), {})
            for sh in SHAPES:
                xs = [ra[i][sh.name] / rb[i][sh.name] for i in ra if i in rb and sh.name in ra[i] and sh.name in rb[i]]
                ratio[(s, t, sh.name, f"{short[a]}/{short[b]}")] = _med(xs)
        lb = by.get((s, t, "llama-bench"), {})
        xs = [v[FA_OFF.name] / v["tg64@d1024"] for v in lb.values() if FA_OFF.name in v]
        ratio[(s, t, FA_OFF.name, "off/auto")] = _med(xs)
    return med, ratio


def _f(x: float, nd: int = 1) -> str:
    return "—" if x != x else f"{x:.{nd}f}"


def report_text(med: dict, ratio: dict, sizes, threads, repeats: int, bench_reps: int, info: dict, commit: dict,
                build_commit: str, version: str, started: str, elapsed: float, load: tuple[str, str]) -> str:
    L = ["# llama.cpp cross-check: llama-bench vs bench.mobile's driver vs our engine\n"]
    L.append(f"Generated by `python -m bench.llama_bench` ({' '.join(sys.argv[1:]) or 'defaults'}) on {started} "
             f"in {elapsed / 60:.1f} min. Random-weight models (bench.mobile's, balanced init), all rows from this "
             "one run.\n")
    L.append(f"- Engine commit: {describe_commit(commit)}")
    L.append(f"- llama.cpp: the copy vendored by llama-cpp-python {version}, in both llama.cpp columns "
             f"(llama-bench build_commit `{build_commit}`, built here with -DGGML_NATIVE=ON, CPU only)")
    L.append(f"- CPU: {info.get('cpu', '?')} ({info.get('cpus')} logical CPUs), SIMD {', '.join(info.get('flags', []))}; "
             f"RAM {info.get('mem_gb', '?')} GB; {info.get('platform')}")
    L.append(f"- Load average at start: {load[0]}; at end: {load[1]}. Shared machine: absolute tok/s are noisy, the "
             "interleaved pair-by-pair ratios much less so.\n")
    L.append("## Method\n")
    L.append(f"{repeats} repeats; in each, for every model and thread count: llama-bench (each shape a separate "
             f"process, `-r {bench_reps}`, its own warm-up run, median of its samples), bench.mobile's worker with "
             "llama-cpp-python, and bench.mobile's worker with our engine, in an order reversed every repeat. Same "
             f"GGUF file for both llama.cpp columns; llama-bench gets `-b {BATCH} -ub {BATCH}` (the driver's batch) and "
             "its defaults otherwise (flash attention auto, F16 KV cache; its context is prompt + gen + depth, the "
             "driver's 2048). pp = one batched prompt, empty cache; tg64 = 64 single-token decodes; @ d1024 = after an "
             "untimed 1024-token prefill. Cells: median tok/s over repeats; ratios: per repeat, then the median.\n")
    L.append("## Results\n")
    L.append("| model | threads | shape | llama-bench tok/s | llama.cpp driver tok/s | ours tok/s | driver / llama-bench "
             "(llama.cpp) | ours / llama-bench | ours / llama.cpp driver | ratio difference |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        for t in threads:
            for sh in SHAPES:
                lb, drv, ours = (med.get((s, t, m, sh.name), float("nan")) for m in METHODS)
                r_ol, r_od, r_dl = (ratio.get((s, t, sh.name, k), float("nan")) for k in ("ours/lb", "ours/drv",
                                                                                          "drv/lb"))
                diff = 100 * (r_ol / r_od - 1) if r_od == r_od and r_od else float("nan")
                L.append(f"| {s} | {t} | {sh.name} | {_f(lb)} | {_f(drv)} | {_f(ours)} | {_f(r_dl, 2)} | {_f(r_ol, 2)} | "
                         f"{_f(r_od, 2)} | {'—' if diff != diff else f'{diff:+.0f}%'} |")
    L.append("\n`ratio difference` = (ours / llama-bench) / (ours / llama.cpp driver) - 1: how much the published "
             "ours-vs-llama.cpp ratio would change if llama.cpp were timed by llama-bench instead of our driver.\n")
    if any(k[3] == "off/auto" for k in ratio):
        L.append("## llama.cpp decode at depth: flash attention on vs off (llama-bench)\n")
        L.append("| model | threads | tg64 tok/s | tg64 @ d1024 (fa auto) | tg64 @ d1024 (fa off) | d1024 / d0 (fa auto) "
                 "| off / auto at d1024 |")
        L.append("|---|---|---|---|---|---|---|")
        for s in sizes:
            for t in threads:
                d0, d1, off = (med.get((s, t, "llama-bench", n), float("nan")) for n in ("tg64", "tg64@d1024",
                                                                                         FA_OFF.name))
                L.append(f"| {s} | {t} | {_f(d0)} | {_f(d1)} | {_f(off)} | {_f(d1 / d0 if d0 else float('nan'), 2)} | "
                         f"{_f(ratio.get((s, t, FA_OFF.name, 'off/auto'), float('nan')), 2)} |")
        L.append("")
    return "\n".join(L) + "\n"


# ---- command line --------------------------------------------------------------------------------------------
def build_parser():
    p = cli.parser("python -m bench.llama_bench", __doc__)
    p.add_argument("--sizes", default="S,dense-1B", help="comma-separated presets (model/config.py)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="interleaved repeats of every method")
    # llama-bench warms a tg test up with one token, so its first tg64 sample also pays the first touch of the
    # experts that token did not use (the driver's decode follows its prefills): the median of 3 drops that sample
    p.add_argument("--bench-reps", type=cli.positive_int, default=3, help="llama-bench -r per process (the median "
                   "of its samples is used)")
    p.add_argument("--no-fa-check", action="store_true", help="skip the llama-bench tg64 @ d1024 run with flash "
                   "attention off")
    p.add_argument("--work", default="/tmp/mmoe-bench", help="where bench.mobile's model files are (or go)")
    p.add_argument("--llama-bench", default="", help="use this llama-bench binary instead of building one "
                   "(default: none)%(default)s")
    p.add_argument("--build-root", default=str(Path.home() / ".cache" / "mobilemoe"), help="where llama-bench is "
                   "built and cached (outside the repo)")
    p.add_argument("--build-only", action="store_true", help="build or locate llama-bench, print its path, exit")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where llama_bench.{md,json} go")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="random-weight and token-id seed")
    p.add_argument("--timeout", type=cli.positive_float, default=1800, help="seconds per process")
    return p


def _ints(opt: str, spec: str) -> list[int]:
    try:
        xs = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise cli.BadInput(f"{opt}: expected comma-separated integers, got {spec!r}") from None
    if not xs or min(xs) < 1:
        raise cli.BadInput(f"{opt}: expected integers >= 1, got {spec!r}")
    return xs


def _main(argv: list[str]) -> int:
    from model.config import PRESETS  # noqa: PLC0415

    a = build_parser().parse_args(argv)
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in PRESETS]
    if bad or not sizes:
        raise cli.BadInput(f"--sizes: unknown {bad or a.sizes!r}; choose from {sorted(PRESETS)}")
    threads = _ints("--threads", a.threads)

    def log(msg):
        print(msg, flush=True)

    version = llama_cpp_python_version()
    try:
        exe = locate_or_build(Path(a.build_root).expanduser(), version, log, a.llama_bench)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: building llama-bench failed: {cli.one_line(e)}", file=sys.stderr)
        return 1
    if a.build_only:
        print(exe)
        return 0
    if not LIB.is_file():
        raise cli.BadInput(f"{LIB} not found: build the engine first (make mobile)")
    started, t_start, load0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time(), loadavg()
    commit = engine_commit()
    try:
        log(f"[bench.llama_bench] models in {a.work}; llama-bench {exe}")
        models = driver.prepare_models(sizes, Path(a.work), a.seed, log)
        rows = run_matrix(models, sizes, threads, a.repeats, exe, a.bench_reps, a.seed, a.timeout, log,
                          fa_check=not a.no_fa_check)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    med, ratio = aggregate(rows)
    build_commit = next((r["build_commit"] for r in rows if "build_commit" in r), "?")
    info = machine_info()
    out = Path(a.out)
    md = out / "llama_bench.md"
    atomic_write(md, report_text(med, ratio, sizes, threads, a.repeats, a.bench_reps, info, commit, build_commit,
                                 version, started, time.time() - t_start, (load0, loadavg())))
    atomic_write(out / "llama_bench_raw.json", json.dumps(dict(info=info, commit=commit, llama_cpp_python=version,
                                                               rows=rows), indent=1))
    log(f"[bench.llama_bench] wrote {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
