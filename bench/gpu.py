"""The one-command GPU check (`make bench-gpu`): ceilings, kernel correctness, kernel and layer speed, one
training step -> bench/results/gpu.md + gpu.json. Sized for at most ~6 minutes on one H100 / H200.

Sections, in run order (a --budget-s deadline cuts the speed sweeps short, never the checks):
  1. ceilings measured on this machine: a dense bf16 torch.mm (8192^3) in TFLOP/s and device copy bandwidth;
  2. correctness of every Triton kernel in bf16 against an fp32 reference of the same bf16 values
     (bench/gpu_checks.py): routing (random / skewed / all-to-one ids), the router (NaN / inf rows), grouped
     GEMM fwd / dX / dW with empty experts, a full MoE layer fwd+bwd, bitwise determinism of two runs, and
     T x d_model > 2^31 (int64 offsets);
  3. one M-shaped training step (2 layers) on one GPU: tokens/s, MFU, and a dtype probe of what reaches
     kernels.moe.moe_experts (bf16 x / w13 / w2, fp32 router and gates);
  4. speed of the whole MoE layer fwd+bwd and of each grouped GEMM at the S / M / L shapes for 16K and 64K
     tokens (bench/gpu_speed.py): TFLOP/s, % of the measured dense GEMM, against torch._grouped_mm (when this
     torch has it), a per-expert torch.mm loop and megablocks (when importable).

Needs only torch, triton and numpy (no matplotlib / pandas) and runs with the system python3 of a GPU
machine, no venv:

    python3 -m bench.gpu                      # writes bench/results/gpu.{md,json}
    python3 -m bench.gpu --out "$OUT"         # on a lent device machine; copy $OUT/gpu.* into bench/results/

`--dry-run` runs every section at tiny shapes on CPU under the Triton interpreter (TRITON_INTERPRET=1, set
here before triton is imported; fp16 operands where the GPU run uses bf16, see bench/gpu_checks.py) and writes to a temporary folder (or --out) a report headed "dry run (CPU
interpreter) — not GPU figures". Without a CUDA device and without --dry-run it exits 2 with one line.
Exit status: 0 every check passed, 1 a correctness check failed (the report is still written), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DRY_BANNER = "dry run (CPU interpreter) — not GPU figures"


@dataclass
class Ctx:
    """What every section needs: device, mode, timing and the shared deadline."""

    device: object  # torch.device
    dry: bool
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    dense_tflops: float = 0.0  # the measured ceiling, for "% of dense"
    lp: object = None  # the kernels' operand dtype: bf16 on a GPU, fp16 in the dry run (bench/gpu_checks.py)
    skipped: list = field(default_factory=list)  # (section, what, why)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def sync(self) -> None:
        import torch  # noqa: PLC0415

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, reps: int, warmup: int = 1) -> float:
        """Median of `reps` calls in ms (CUDA events on a GPU, perf_counter on CPU), after `warmup` calls."""
        import torch  # noqa: PLC0415

        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        times.sort()
        return times[len(times) // 2]


def ceilings(ctx: Ctx) -> dict:
    """Dense bf16 GEMM TFLOP/s (torch.mm, n^3) and device copy bandwidth (read + write bytes / time)."""
    import torch  # noqa: PLC0415

    n, copy_mib, reps = (256, 16, 3) if ctx.dry else (8192, 2048, 20)
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.lp)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.lp)
    c = torch.empty(n, n, device=ctx.device, dtype=ctx.lp)
    ms = ctx.time_ms(lambda: torch.mm(a, b, out=c), reps, warmup=3)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    src = torch.empty(copy_mib << 20, dtype=torch.uint8, device=ctx.device).fill_(1)
    dst = torch.empty_like(src)
    ms_copy = ctx.time_ms(lambda: dst.copy_(src), reps, warmup=2)
    gbs = 2 * src.numel() / (ms_copy * 1e-3) / 1e9
    ctx.dense_tflops = tflops
    ctx.log(f"ceilings: dense {str(ctx.lp).removeprefix('torch.')} mm {n}^3 {tflops:.1f} TFLOP/s, copy {copy_mib} MiB {gbs:.0f} GB/s")
    return dict(gemm_n=n, gemm_dtype=str(ctx.lp).removeprefix("torch."), gemm_ms=ms, dense_tflops=tflops, copy_mib=copy_mib, copy_ms=ms_copy, copy_gbs=gbs)


def _versions() -> dict:
    import numpy  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    return dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
                numpy=numpy.__version__, cuda=torch.version.cuda, has_grouped_mm=hasattr(torch, "_grouped_mm"))


def _device_name(ctx: Ctx) -> str:
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"CPU {platform.machine()} x{os.cpu_count()} (Triton interpreter)"


def run(ctx: Ctx, sections: set[str]) -> dict:
    import torch  # noqa: PLC0415

    from bench import gpu_checks, gpu_speed  # noqa: PLC0415  (import triton: after TRITON_INTERPRET is set)

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references are true fp32
    torch.backends.cudnn.allow_tf32 = False
    res = dict(meta=dict(dry_run=ctx.dry, device=_device_name(ctx), **_versions(),
                         operand_dtype=str(ctx.lp).removeprefix("torch."),
                         started_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), budget_s=ctx.budget_s,
                         command="python3 -m bench.gpu" + (" --dry-run" if ctx.dry else "")))
    ctx.log(f"device: {res['meta']['device']}; torch {torch.__version__}, triton {res['meta']['triton']}")
    res["ceilings"] = ceilings(ctx)
    res["checks"] = gpu_checks.run_all(ctx) if "checks" in sections else []
    res["train"] = gpu_speed.train_step(ctx) if "train" in sections else None
    if res["train"]:  # the precision policy's contract is a correctness check like the others
        p = res["train"]["probe"]
        calls = p["moe_experts_calls"]
        res["checks"].append(dict(
            name="dtype probe: training step -> kernels.moe.moe_experts", passed=p["passed"], err=None, tol=None,
            detail=f"{len(calls)} calls, x/w13/w2/gates {sorted({(c['x'], c['w13'], c['w2'], c['gates']) for c in calls})}, "
                   f"router logits {sorted(set(p['router_logits']))} (want {p['want']})"))
    res["layer"] = gpu_speed.layer_speed(ctx) if "layer" in sections else []
    res["gemm"] = gpu_speed.gemm_speed(ctx) if "gemm" in sections else []
    res["skipped"] = [dict(section=s, what=w, why=y) for s, w, y in ctx.skipped]
    res["meta"]["wall_s"] = time.perf_counter() - ctx.t0
    return res


SECTIONS = ("checks", "train", "layer", "gemm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPU check: ceilings, kernel correctness, kernel/layer speed, one "
                                             "training step -> gpu.md + gpu.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on CPU under the Triton interpreter (not GPU figures)")
    ap.add_argument("--out", help="output folder (default bench/results; a temporary folder for --dry-run)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="after this many seconds the remaining speed rows are skipped (checks always run)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (ceilings always run)")
    a = ap.parse_args(argv)
    sections = {s for s in a.only.split(",") if s}
    if not sections <= set(SECTIONS):
        print(f"error: --only takes {','.join(SECTIONS)}, got {a.only!r}", file=sys.stderr)
        return 2
    if a.budget_s <= 0:
        print(f"error: --budget-s must be > 0, got {a.budget_s}", file=sys.stderr)
        return 2
    if a.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --dry-run must set TRITON_INTERPRET=1 before triton is imported; run it as "
                  "`python -m bench.gpu --dry-run` in a fresh process", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    import torch  # noqa: PLC0415

    if a.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: bench.gpu measures a GPU (torch.cuda.is_available() is False); "
              "use --dry-run for the CPU-interpreter rehearsal", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="bench-gpu-dry-")) if a.dry_run else RESULTS)
    ctx = Ctx(device=device, dry=a.dry_run, budget_s=a.budget_s, lp=torch.float16 if a.dry_run else torch.bfloat16)
    if a.dry_run:
        ctx.log(DRY_BANNER)
    res = run(ctx, sections)
    from bench.gpu_report import write_reports  # noqa: PLC0415

    md, js = write_reports(res, out)
    failed = [c["name"] for c in res["checks"] if not c["passed"]]
    ctx.log(f"wrote {md} and {js}")
    if failed:
        ctx.log(f"FAILED checks: {', '.join(failed)}")
        return 1
    ctx.log(f"all {len(res['checks'])} correctness checks passed" if res["checks"] else
            "no correctness checks ran (--only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
