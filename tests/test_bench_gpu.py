"""bench/gpu.py: the dry run (every section at tiny shapes, CPU Triton interpreter) runs end to end in a fresh
process, writes a report marked as not GPU figures with every section, and all its correctness checks pass;
without a CUDA device and without --dry-run the script refuses in one line instead of writing made-up rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself, before triton is imported
    return env


def test_dry_run_writes_a_complete_report_and_every_check_passes(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=240)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    md = (out / "gpu.md").read_text()
    res = json.loads((out / "gpu.json").read_text())
    from bench.gpu import DRY_BANNER  # noqa: PLC0415
    from bench.gpu_report import SECTION_TITLES  # noqa: PLC0415

    assert DRY_BANNER in md.splitlines()[2], md[:400]
    assert res["meta"]["dry_run"] is True and res["meta"]["operand_dtype"] == "float16"
    for title in SECTION_TITLES:
        assert title + "\n" in md, f"section {title!r} missing from the report"
    checks = {c["name"]: c for c in res["checks"]}
    failed = [n for n, c in checks.items() if not c["passed"]]
    assert not failed, failed
    # every family of check ran (names as bench/gpu_checks.py gives them)
    for prefix in ("routing random", "routing skewed", "routing all-to-one", "router softmax", "router sigmoid",
                   "grouped GEMM up (gathered) fwd", "grouped GEMM up (gathered) dX", "grouped GEMM up (gathered) dW",
                   "grouped GEMM down fwd", "grouped GEMM down dX", "grouped GEMM down dW",
                   "grouped GEMM down dW of empty experts", "MoE layer fwd+bwd (triton",
                   "MoE layer fwd+bwd bitwise deterministic", "MoE layer fwd+bwd with T x d_model > 2^31",
                   "dtype probe"):
        assert any(n.startswith(prefix) for n in checks), f"no check named {prefix!r}: {sorted(checks)}"
    probe = res["train"]["probe"]
    assert probe["passed"] and probe["moe_experts_calls"], probe
    assert all(c["x"] == c["w13"] == c["w2"] == "bfloat16" and c["gates"] == "float32"
               for c in probe["moe_experts_calls"]), probe
    # the speed sections produced rows for S, M and L (tiny shapes) with a Triton time each
    assert {r["shape"] for r in res["layer"]} == {"S", "M", "L"}
    assert {r["shape"] for r in res["gemm"]} == {"S", "M", "L"}
    assert all(r["fwd_bwd"]["triton"]["ms"] for r in res["layer"])
    assert all(r["res"]["triton"]["ms"] for r in res["gemm"])
    assert len({r["op"] for r in res["gemm"]}) == 6
    assert res["ceilings"]["dense_tflops"] > 0 and res["ceilings"]["copy_gbs"] > 0


def test_without_cuda_and_without_dry_run_exits_2_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)], cwd=ROOT,
                       env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == "" and p.stderr.startswith("no CUDA device: ") and p.stderr.count("\n") == 1, p.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written without a GPU"


def test_bad_arguments_exit_2_in_one_line(tmp_path):
    for args in (["--only", "checks,plots"], ["--budget-s", "0"]):
        p = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(tmp_path), *args], cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, (args, p.stderr)
    assert not list(tmp_path.iterdir())
