"""MoE kernel microbenchmarks -> bench/results/kernels.md + kernels.png  (`make bench-kernels`).

CPU (always): the reference MoE layer (router + dropless routed SwiGLU experts, kernels.moe reference path)
forward+backward vs a dense SwiGLU FFN with the same active FLOPs (hidden = K * F) vs a naive loop over
experts (boolean mask per expert + index_add, the usual eager implementation), across E, K and token counts,
at the tiny preset's layer shape and the S preset's shape scaled to 1/4 width. The headline is the ratio
MoE time / dense time (goal <= 1.3). The reference's GEMM strategies (padded bmm / per-expert slices /
torch._grouped_mm) are compared at one token count.

CUDA (when a GPU is present): Triton vs reference vs torch._grouped_mm vs megablocks (if installed) on the
full S layer shape in bf16, forward and forward+backward, TFLOP/s and tokens/s. On a CPU machine the table
says these rows were not measured.

Also compiles every Triton kernel for sm_80 / sm_90 (no GPU needed) and reports shared memory per kernel.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.moe import moe_experts, moe_experts_reference
from kernels.router import route_reference
from model import cli

OUT = Path(__file__).resolve().parent / "results"
# (name, d_model, expert_ffn_dim): the tiny preset, and the S preset (1280, 160) at 1/4 width for a 2-core CPU
SHAPES = [("tiny", 128, 64), ("S/4", 320, 40)]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _time(fns: dict, reps: int, sync=lambda: None, clock=time.perf_counter) -> dict:
    """Fastest of `reps` calls, in seconds; candidates are interleaved rep by rep so drift hits all alike.
    With one CPU thread the clock is time.thread_time (CPU time of this thread), which a shared, loaded
    machine does not inflate the way it inflates wall time."""
    for f in fns.values():
        f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = clock()
            f()
            sync()
            times[k].append(clock() - t)
    return {k: min(v) for k, v in times.items()}


def naive_moe(x_TD, ids_TK, gates_TK, w13, w2):
    """The usual eager loop: for each expert, mask its tokens, run it, index_add the weighted result."""
    out = torch.zeros_like(x_TD)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        g, u = (x_TD[tok] @ w13[e].t()).chunk(2, dim=-1)
        y = (F.silu(g) * u) @ w2[e].t()
        out = out.index_add(0, tok, y * gates_TK[tok, slot].unsqueeze(-1))
    return out


class Layer:
    """Parameters of one MoE layer and its equal-active-FLOPs dense SwiGLU twin."""

    def __init__(self, D, Fh, E, K, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(device, dtype).requires_grad_()
        self.E, self.K = E, K
        self.router = mk(E, D)
        self.w13, self.w2 = mk(E, 2 * Fh, D), mk(E, D, Fh)
        self.dense13, self.dense2 = mk(2 * K * Fh, D), mk(D, K * Fh)

    def route(self, x_TD):
        logits = F.linear(x_TD.float(), self.router.float())
        ids, gates, _ = route_reference(logits, self.K, "softmax", True)
        return ids, gates.to(x_TD.dtype)

    def moe(self, x_TD, backend="reference", method="auto"):
        ids, gates = self.route(x_TD)
        if backend == "reference":
            return moe_experts_reference(x_TD, ids, gates, self.w13, self.w2, method=method)
        if backend == "naive":
            return naive_moe(x_TD, ids, gates, self.w13, self.w2)
        return moe_experts(x_TD, ids, gates, self.w13, self.w2, backend=backend)

    def dense(self, x_TD):
        g, u = F.linear(x_TD, self.dense13).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.dense2)


def _fwd_bwd(f, x, dy):
    def run():
        x.grad = None
        f(x).backward(dy)
    return run


def _fwd_only(f, x):
    def run():
        with torch.no_grad():
            f(x)
    return run


def bench_cpu(tokens, experts, topks, reps, naive_max_tokens, method_tokens, log, clock):
    rows = []
    for shape, D, Fh in SHAPES:
        for E in experts:
            for K in topks:
                if K > E:
                    continue
                layer = Layer(D, Fh, E, K, "cpu", torch.float32)
                for T in tokens:
                    g = torch.Generator().manual_seed(T)
                    x = torch.randn(T, D, generator=g).requires_grad_()
                    dy = torch.randn(T, D, generator=g)
                    fns = {"moe": _fwd_bwd(layer.moe, x, dy), "dense": _fwd_bwd(layer.dense, x, dy)}
                    if T <= naive_max_tokens:
                        fns["naive"] = _fwd_bwd(lambda z, ly=layer: ly.moe(z, "naive"), x, dy)
                    if T == method_tokens:
                        for m in ("padded", "slices", "grouped_mm"):
                            fns[m] = _fwd_bwd(lambda z, m=m, ly=layer: ly.moe(z, "reference", m), x, dy)
                    t = _time(fns, reps, clock=clock)
                    flops = 3 * 2 * 3 * T * K * D * Fh  # fwd+bwd = 3x fwd; 3 matrices per expert, 2 flop/MAC
                    row = dict(shape=shape, D=D, F=Fh, E=E, K=K, T=T, moe_ms=1e3 * t["moe"], dense_ms=1e3 * t["dense"],
                               ratio=t["moe"] / t["dense"], naive_ms=1e3 * t.get("naive", float("nan")),
                               gflops=flops / t["moe"] / 1e9)
                    for m in ("padded", "slices", "grouped_mm"):
                        row[m + "_ms"] = 1e3 * t.get(m, float("nan"))
                    rows.append(row)
                    log(f"  {shape:5s} E={E:3d} K={K} T={T:5d}  moe {row['moe_ms']:8.2f} ms  dense {row['dense_ms']:8.2f} ms"
                        f"  ratio {row['ratio']:.2f}  naive {row['naive_ms']:8.2f} ms")
    return rows


def bench_gpu(reps, log):
    """Triton vs reference vs torch._grouped_mm vs megablocks on the S layer shape, bf16 (CUDA only)."""
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    D, Fh, E, K = 1280, 160, 64, 6
    layer = Layer(D, Fh, E, K, dev, torch.bfloat16)
    backends = ["triton", "reference", "grouped_mm"]
    try:
        import megablocks  # noqa: F401, PLC0415
        backends.append("megablocks")
    except ImportError:
        log("  megablocks not installed: its rows are skipped")
    rows = []
    for T in (4096, 16384):
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        for b in backends:
            f = (lambda z: layer.moe(z, "reference", "grouped_mm")) if b == "grouped_mm" else (lambda z, b=b: layer.moe(z, b))
            try:
                t = _time({"fwd": _fwd_only(f, x), "fwd+bwd": _fwd_bwd(f, x, dy)}, reps, sync)
            except Exception as e:  # noqa: BLE001  (e.g. _grouped_mm needs sm_90): report, keep going
                log(f"  {b}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            fl = 2 * 3 * T * K * D * Fh
            for mode, mult in (("fwd", 1), ("fwd+bwd", 3)):
                rows.append(dict(backend=b, T=T, mode=mode, ms=1e3 * t[mode], tflops=mult * fl / t[mode] / 1e12,
                                 tok_s=T / t[mode]))
                log(f"  {b:10s} T={T:6d} {mode:8s} {1e3 * t[mode]:8.3f} ms  {rows[-1]['tflops']:6.1f} TFLOP/s")
    return rows


def compile_table(log):
    try:
        from kernels.aot import compile_all  # noqa: PLC0415

        return compile_all((80, 90))
    except Exception as e:  # noqa: BLE001
        log(f"  cubin compile failed: {type(e).__name__}: {e}")
        return []


def write_markdown(cpu, gpu, comp, args, gpu_name) -> str:
    L = ["# MoE kernel benchmarks", "",
         f"Generated by `make bench-kernels` (`python -m bench.kernels`) on {platform.machine()} "
         f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
         ("Times are the fastest of interleaved repetitions, measured as this thread's CPU time (time.thread_time), "
          "so a shared, loaded machine does not inflate them." if args.threads == 1 else
          "Times are the fastest of interleaved repetitions (wall clock)."), ""]
    if cpu:
        ratios = [r["ratio"] for r in cpu]
        gm = statistics.geometric_mean(ratios)
        ok = sum(r <= 1.3 for r in ratios)
        L += ["## CPU: reference MoE layer vs dense SwiGLU at equal active FLOPs (forward + backward, fp32)", "",
              f"**MoE / dense time ratio: geometric mean {gm:.2f} over {len(ratios)} configurations, median "
              f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}; {ok}/{len(ratios)} within the 1.3x goal.**",
              "", "MoE = fp32 router + top-k + dropless routed experts (reference path, method auto); dense hidden = K*F. "
              "naive = per-expert mask + index_add loop.", "",
              "| shape | D | F | E | K | tokens | MoE ms | dense ms | MoE/dense | naive ms | naive/MoE | MoE GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cpu:
            nv = "" if r["naive_ms"] != r["naive_ms"] else f"{r['naive_ms']:.1f}"
            nr = "" if not nv else f"{r['naive_ms'] / r['moe_ms']:.2f}"
            L.append(f"| {r['shape']} | {r['D']} | {r['F']} | {r['E']} | {r['K']} | {r['T']} | {r['moe_ms']:.2f} | "
                     f"{r['dense_ms']:.2f} | {r['ratio']:.2f} | {nv} | {nr} | {r['gflops']:.1f} |")
        meth = [r for r in cpu if r["padded_ms"] == r["padded_ms"]]
        if meth:
            L += ["", f"### Reference GEMM strategy (tokens = {args.method_tokens}, fwd+bwd ms)", "",
                  "| shape | E | K | padded bmm | per-expert slices | torch._grouped_mm | dense |", "|---|---|---|---|---|---|---|"]
            for r in meth:
                L.append(f"| {r['shape']} | {r['E']} | {r['K']} | {r['padded_ms']:.2f} | {r['slices_ms']:.2f} | "
                         f"{r['grouped_mm_ms']:.2f} | {r['dense_ms']:.2f} |")
            wins = {m: sum(min(("padded", "slices", "grouped_mm"), key=lambda k, r=r: r[k + "_ms"]) == m for r in meth)
                    for m in ("padded", "slices", "grouped_mm")}
            L += ["", "Fastest per row: " + ", ".join(f"{m} {n}" for m, n in wins.items()) +
                  ". `moe_experts_reference(method='auto')` uses per-expert slices (hand-written backward)."]
    L += ["", "## CUDA: Triton vs reference vs torch._grouped_mm vs megablocks (S layer: D 1280, F 160, E 64, K 6, bf16)", ""]
    if gpu:
        L += [f"Device: {gpu_name}", "", "| backend | tokens | pass | ms | TFLOP/s | tokens/s |", "|---|---|---|---|---|---|"]
        for r in gpu:
            L.append(f"| {r['backend']} | {r['T']} | {r['mode']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['tok_s']:.3g} |")
    else:
        L += ["**Not measured: no CUDA device on this machine.** The same command measures these rows unchanged on a GPU."]
    if comp:
        L += ["", "## Triton kernels compiled to cubin without a GPU (bf16, real launch configurations)", "",
              "| kernel | triton fn | sm | shared mem (B) | warps | stages | cubin (B) | wgmma |", "|---|---|---|---|---|---|---|---|"]
        for r in comp:
            L.append(f"| {r['kernel']} | {r['triton_fn']} | {r['cc']} | {r['shared_bytes']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['cubin_bytes']} | {'yes' if r['wgmma'] else 'no'} |")
    return "\n".join(L) + "\n"


def write_plot(cpu, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shapes = list(dict.fromkeys(r["shape"] for r in cpu))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in cpu if r["shape"] == shape]
        for E in sorted({r["E"] for r in rs}):
            for K in sorted({r["K"] for r in rs if r["E"] == E}):
                pts = sorted((r["T"], r["ratio"]) for r in rs if r["E"] == E and r["K"] == K)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"E={E} K={K}")
        ax.axhline(1.3, color="red", ls="--", lw=1, label="goal 1.3x")
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("MoE / dense time (fwd+bwd)")
        ax.set_title(f"{shape}: reference MoE vs equal-FLOPs dense (CPU)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _ints(s: str, name: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise SystemExit(f"error: --{name} must be comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise SystemExit(f"error: --{name} needs positive integers, got {s!r}")
    return v


def main(argv=None) -> int:
    ap = cli.parser("python -m bench.kernels", "MoE kernel microbenchmarks -> bench/results/kernels.{md,png}")
    ap.add_argument("--tokens", default="512,2048,8192", help="token counts, comma separated")
    ap.add_argument("--experts", default="8,16,64", help="expert counts, comma separated")
    ap.add_argument("--topk", default="1,2,4,8", help="top-k values, comma separated")
    ap.add_argument("--reps", type=cli.positive_int, default=3, help="timed repeats per cell")
    ap.add_argument("--threads", type=cli.positive_int, default=1,
                    help="CPU threads (1: timed by thread CPU time; more: by wall clock)")
    ap.add_argument("--naive-max-tokens", type=int, default=512, help="run the naive loop up to this many tokens")
    ap.add_argument("--method-tokens", type=int, default=2048, help="token count for the GEMM-strategy comparison")
    ap.add_argument("--no-compile", action="store_true", help="skip the sm_80/sm_90 cubin compile table")
    ap.add_argument("--out", default=str(OUT), help="output folder for kernels.md / kernels.png")
    a = ap.parse_args(argv)
    tokens, experts, topks = _ints(a.tokens, "tokens"), _ints(a.experts, "experts"), _ints(a.topk, "topk")
    if a.reps < 1 or a.threads < 1:
        print("error: --reps and --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    log = lambda s: print(s, flush=True)
    log(f"CPU: reference MoE vs dense, {a.threads} thread(s)")
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    cpu = bench_cpu(tokens, experts, topks, a.reps, a.naive_max_tokens, a.method_tokens, log, clock)
    gpu, gpu_name = [], ""
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
        log(f"CUDA: {gpu_name}")
        gpu = bench_gpu(max(a.reps, 10), log)
    else:
        log("CUDA: no GPU on this machine - the GPU rows were not measured")
    comp = [] if a.no_compile else compile_table(log)
    md = write_markdown(cpu, gpu, comp, a, gpu_name)
    old = out / "kernels.md"
    if old.exists():  # keep the section bench.cpu_moe writes (a separate, slower measurement)
        from bench.cpu_moe import BEGIN, END, splice  # noqa: PLC0415

        prev = old.read_text()
        if BEGIN in prev and END in prev:
            md = splice(md, prev[prev.index(BEGIN):prev.index(END) + len(END)])
    _atomic_write(out / "kernels.md", md.encode())
    write_plot(cpu, out / "kernels.png")
    log(f"wrote {out / 'kernels.md'} and {out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
