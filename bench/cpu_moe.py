"""CPU training path of the routed experts, before/after  (python -m bench.cpu_moe)  -> a section of kernels.md.

Before = kernels.moe.moe_experts_reference (backend "reference", what "auto" runs on CPU); after =
kernels/moe_cpu.py (backend "cpu", opt-in: "auto" stays on the reference because of what this measures). Measured in one run, candidates interleaved
repeat by repeat, medians:
  layer  one MoE layer forward + backward (fp32 router, top-k, routed experts; no shared expert) vs a dense
         SwiGLU of equal active FLOPs (hidden K*F), at the tiny preset's layer and the scaling sweep's
         default MoE point (d64-X8-G4-s1: D 64, F 64, E 24, K 3);
  step   a full training step (bench.compile's step: CE + aux loss, backward, clip, AdamW) of the tiny preset
         (B 16 x T 128, as `make train`) and of the sweep point (B 16 x T 64, as train.scaling), tokens/s.
With one thread the clock is this thread's CPU time (a loaded machine inflates it less); with more, wall time.
The section between the markers below is replaced in bench/results/kernels.md; bench.kernels keeps it.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import cli

OUT = Path(__file__).resolve().parent / "results" / "kernels.md"
BEGIN, END = "<!-- bench.cpu_moe: begin -->", "<!-- bench.cpu_moe: end -->"
# (name, T, D, F, E, K): the layer shapes of the tiny preset (one micro-batch of make train) and of the sweep point
LAYERS = [("tiny", 2048, 128, 64, 16, 2), ("sweep d64-X8-G4-s1", 1024, 64, 64, 24, 3)]


def _interleaved(fns: dict, reps: int, clock) -> dict:
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            t[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in t.items()}


def _layer_row(name: str, T: int, D: int, Fh: int, E: int, K: int, reps: int, clock) -> dict:
    from kernels.moe import moe_experts
    from kernels.router import route_reference

    g = torch.Generator().manual_seed(0)

    def mk(*s):
        return (torch.randn(*s, generator=g) * s[-1] ** -0.5).requires_grad_()

    router, w13, w2 = mk(E, D), mk(E, 2 * Fh, D), mk(E, D, Fh)
    d13, d2 = mk(2 * K * Fh, D), mk(D, K * Fh)
    x = torch.randn(T, D, generator=g).requires_grad_()
    dy = torch.randn(T, D, generator=g)

    def moe(backend):
        def run():
            ids, gates, _ = route_reference(F.linear(x, router), K, "softmax", True)
            moe_experts(x, ids, gates, w13, w2, backend=backend).backward(dy)
        return run

    def dense():
        a, b = F.linear(x, d13).chunk(2, dim=-1)
        F.linear(F.silu(a) * b, d2).backward(dy)

    t = _interleaved({"before": moe("reference"), "after": moe("cpu"), "dense": dense}, reps, clock)
    return dict(name=name, T=T, D=D, F=Fh, E=E, K=K, **{k: 1e3 * v for k, v in t.items()})


def bench_layers(reps: int, clock) -> list[dict]:
    return [_layer_row(*shape, reps, clock) for shape in LAYERS]


def bench_steps(blocks: int, steps: int, clock) -> list[dict]:
    from bench.compile import _step
    from model.config import get_config
    from model.model import MobileMoE
    from train.scaling import arch_overrides

    rows = []
    for name, cfg_kw, B, T in (("tiny", {}, 16, 128), ("sweep d64-X8-G4-s1", arch_overrides(64, 3, 8, 4, 1), 16, 64)):
        runs = {}
        for k, backend in (("before", "reference"), ("after", "cpu")):
            torch.manual_seed(0)
            m = MobileMoE(get_config("tiny", **cfg_kw, moe_backend="reference"))
            m.cfg.moe_backend = backend  # "cpu" is a kernels-level backend that ModelConfig does not list
            runs[k] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
        cfg = runs["before"][0].cfg
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(4)]
        mask = torch.ones(B, T)
        loss0 = {k: float(_step(m, m, o, batches[0], mask)) for k, (m, o) in runs.items()}
        rate = {k: [] for k in runs}
        for i in range(blocks):
            for k, (m, o) in runs.items():
                t0 = clock()
                for j in range(steps):
                    _step(m, m, o, batches[(i + j) % len(batches)], mask)
                rate[k].append(steps * B * T / (clock() - t0))
        rows.append(dict(name=name, B=B, T=T, **{k: statistics.median(v) for k, v in rate.items()},
                         dloss=abs(loss0["before"] - loss0["after"])))
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def section(results: dict, args) -> str:
    from bench.machine import machine_info  # noqa: PLC0415

    info = machine_info()
    L = [BEGIN, "## CPU training path: kernels/moe_cpu.py (after) vs the reference (before)", "",
         f"`python -m bench.cpu_moe` on {info.get('cpu', '?')} ({platform.machine()}, {os.cpu_count()} CPUs, "
         f"SIMD {' '.join(info.get('flags', [])) or '?'}; load average {os.getloadavg()[0]:.1f} at the end: a shared "
         f"machine), torch {torch.__version__}, commit {_commit()} (+ the working tree "
         f"it ran from), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Interleaved repeats, medians; 1 thread "
         "timed by thread CPU time, 2 threads by wall time. Before = backend `reference` (what `auto` runs on CPU), "
         "after = backend `cpu` (kernels/moe_cpu.py, opt-in). With more than one thread the wall times include "
         "waiting for cores when the machine is loaded (OpenMP threads meet at a barrier after every op; "
         "bench/results/threads.md), so read those rows against the load average above.", ""]
    for threads, r in results.items():
        L += [f"### {threads} thread(s)", "",
              f"MoE layer forward + backward (router + top-k + routed experts, fp32; {args.reps} repeats):", "",
              "| shape | tokens | D | F | E | K | before ms | after ms | after/before | dense ms | "
              "MoE/dense before | MoE/dense after |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["layers"]:
            L.append(f"| {x['name']} | {x['T']} | {x['D']} | {x['F']} | {x['E']} | {x['K']} | {x['before']:.2f} | "
                     f"{x['after']:.2f} | {x['after'] / x['before']:.2f} | {x['dense']:.2f} | "
                     f"{x['before'] / x['dense']:.2f} | {x['after'] / x['dense']:.2f} |")
        L += ["", f"Full training step ({args.blocks} interleaved blocks of {args.steps} steps):", "",
              "| model | batch | before tok/s | after tok/s | after/before | first-step loss diff |",
              "|---|---|---|---|---|---|"]
        for x in r["steps"]:
            L.append(f"| {x['name']} | {x['B']} x {x['T']} | {x['before']:.0f} | {x['after']:.0f} | "
                     f"{x['after'] / x['before']:.2f} | {x['dloss']:.1e} |")
        L.append("")
    return "\n".join(L + [END]) + "\n"


def splice(md: str, sec: str) -> str:
    """md with its cpu_moe section replaced by sec (appended when it has none)."""
    if BEGIN in md and END in md:
        a, b = md.index(BEGIN), md.index(END) + len(END)
        return md[:a] + sec.rstrip("\n") + md[b:]
    return md.rstrip("\n") + "\n\n" + sec


def main(argv=None) -> int:
    ap = cli.parser("python -m bench.cpu_moe", "CPU MoE training path before/after -> a section of kernels.md")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma separated")
    ap.add_argument("--reps", type=cli.positive_int, default=15, help="layer repeats per candidate")
    ap.add_argument("--blocks", type=cli.positive_int, default=5, help="interleaved step blocks per candidate")
    ap.add_argument("--steps", type=cli.positive_int, default=3, help="steps per block")
    ap.add_argument("--out", default=str(OUT), help="the markdown file whose section is replaced")
    a = ap.parse_args(argv)
    try:
        threads = [int(t) for t in a.threads.split(",") if t]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        print(f"error: --threads must be comma-separated positive integers, got {a.threads!r}", file=sys.stderr)
        return 2
    results = {}
    for n in threads:
        torch.set_num_threads(n)
        clock = time.thread_time if n == 1 else time.perf_counter
        layers = bench_layers(a.reps, clock)
        for x in layers:
            print(f"[{n}t] layer {x['name']}: before {x['before']:.2f} ms, after {x['after']:.2f} ms, "
                  f"dense {x['dense']:.2f} ms", flush=True)
        steps = bench_steps(a.blocks, a.steps, clock)
        for x in steps:
            print(f"[{n}t] step {x['name']}: before {x['before']:.0f} tok/s, after {x['after']:.0f} tok/s", flush=True)
        results[n] = dict(layers=layers, steps=steps)
    out = Path(a.out)
    from model.atomic import atomic_write  # noqa: PLC0415

    md = out.read_text() if out.exists() else "# MoE kernel benchmarks\n"
    atomic_write(out, splice(md, section(results, a)).encode())
    print(f"wrote the cpu_moe section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
