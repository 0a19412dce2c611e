"""bench.mobile's measuring side: the random-weight model files, the worker (one fresh process per engine,
model and thread count, printing one JSON line) and the interleaved repeat loop that starts the workers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import mobile_runners as runners
from bench.machine import loadavg, run_cmd
from model.config import get_config

MODEL_FORMAT = 4  # bump when the random models change: 4 = model/init.py's balanced random init


# ================================================================================================
# Worker side: one fresh process per (engine, model, threads); prints one JSON line.
# ================================================================================================
def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _runner(engine: str, model: str, threads: int):
    # looked up on the module at call time, so a test can stand a fake engine in for either
    return runners.OursRunner(model, threads) if engine == "ours" else runners.LlamaRunner(model, threads)


def worker(engine: str, model: str, threads: int, plan: dict) -> dict:
    rng = np.random.default_rng(plan["seed"])
    t0 = time.perf_counter()
    r = _runner(engine, model, threads)
    out: dict = dict(engine=engine, threads=threads, load_s=time.perf_counter() - t0, kernels=r.kernels,
                     prefill={}, decode={}, profile={}, routing={"prefill": {}, "decode": {}})
    lo, hi = plan["id_range"]
    r.eval([int(rng.integers(lo, hi))])  # warm-up: first-touch of the code paths and mmap'd weights
    prompts = sorted(plan["prompts"])
    for n in prompts:
        r.reset()
        ids = [int(x) for x in rng.integers(lo, hi, n)]
        r.routing_reset()
        t = time.perf_counter()
        r.eval(ids)
        out["prefill"][str(n)] = time.perf_counter() - t
        out["routing"]["prefill"][str(n)] = r.routing()
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
        r.routing_reset()
        t = time.perf_counter()
        for tok in ids:
            r.eval([tok])
        out["decode"][str(ctx)] = time.perf_counter() - t
        out["profile"][str(ctx)] = r.profile()
        out["routing"]["decode"][str(ctx)] = r.routing()
    out["peak_rss_mb"] = _peak_rss_mb()
    r.close()
    return out


# ================================================================================================
# Driver side
# ================================================================================================
def model_paths(size: str, work: Path) -> dict[str, Path]:
    return {"ours": work / f"{size}-random.mmoe", "llama.cpp": work / f"{size}-random-q4_0.gguf"}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):  # absent, or torn by a killed run: the models are rebuilt
        return None


def prepare_models(sizes: list[str], work: Path, seed: int, log, gguf: bool = True) -> dict[str, dict[str, Path]]:
    """{size: {"ours": .mmoe, "llama.cpp": .gguf}}; reuses a .mmoe whose stamp (size, seed, format and the
    preset's whole config, so an edited preset is never measured from a stale file) matches.
    The .gguf is derived from that .mmoe, so it is deleted whenever the .mmoe is rebuilt, and (gguf=False, a
    run without llama.cpp) only made when asked for."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in sizes:
        paths = model_paths(s, work)
        mm, gg = paths["ours"], paths["llama.cpp"]
        stamp = work / f"{s}.stamp.json"
        want = dict(size=s, seed=seed, format=MODEL_FORMAT, config=get_config(s).to_dict())
        if not (_read_stamp(stamp) == want and mm.is_file()):
            stamp.unlink(missing_ok=True)
            gg.unlink(missing_ok=True)
            t = time.time()
            run_cmd([sys.executable, "-m", "mobile", "export", "--random-init", "--size", s, "--seed", str(seed),
                     "--out", str(mm)])
            log(f"  exported {mm.name} ({mm.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
            stamp.write_text(json.dumps(want))
        if gguf and not gg.is_file():
            from mobile.gguf_export import mmoe_to_gguf  # noqa: PLC0415  (imports torch: only when needed)

            t = time.time()
            mmoe_to_gguf(mm, gg)  # the same INT4 weights, re-laid out as Q4_0: both engines run one model
            log(f"  exported {gg.name} ({gg.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f} s")
        out[s] = paths
    return out


def run_matrix(models: dict, sizes: list[str], threads: list[int], repeats: dict[str, int], plan_base: dict,
               decode_tokens: dict[str, int], engines: list[str], log, timeout: float,
               on_row: Callable[[list[dict]], None] | None = None, commit: dict | None = None) -> list[dict]:
    """Every (size, threads, engine) once per repeat, engines in alternating order; on_row(rows so far) after
    each worker (so an interrupted run keeps its rows). Each row records `commit`, the engine's git state."""
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
                    res = json.loads(run_cmd(cmd, timeout=timeout).strip().splitlines()[-1])
                    res.update(size=s, rep=rep, decode_tokens=plan["decode_tokens"], loadavg=loadavg(),
                               engine_commit=commit)
                    rows.append(res)
                    if on_row is not None:
                        on_row(rows)
                    d0 = res["decode"].get("0")
                    pl = plan["prompts"][-1]
                    log(f"  rep {rep} {s:>8} t{t} {e:>9}: prefill{pl} {pl / res['prefill'][str(pl)]:7.1f} tok/s"
                        f"  decode {plan['decode_tokens'] / d0 if d0 else float('nan'):6.2f} tok/s"
                        f"  rss {res['peak_rss_mb']:.0f} MB  ({time.time() - t0:.0f} s, load {loadavg()})")
    return rows
