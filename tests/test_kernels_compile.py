"""The Triton kernel variants a training step launches compile to cubin for sm_80 and sm_90 at the S, M and L
expert shapes (bf16 operands, fp32 accumulation), without spills, within shared memory, on tensor cores.

No GPU needed: triton.compile with ASTSource + GPUTarget. kernels/aot.py runs the training ops themselves
(router forward, routed experts forward + backward) under record_launches, so the variants compiled here are the
launch plans, tile tables (config_for / pick_block) and argument dtypes of the run-time path. Must run WITHOUT
TRITON_INTERPRET (the interpreter replaces the compiler); the interpreter tests run in their own process.

Cost: every distinct binary is compiled once per process (kernels.aot caches by variant). S, M and L compile
every kernel a training step launches, for both architectures; M also compiles the two megablocks-only kernels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kernels._triton_util import cdiv
from kernels.aot import SIZES, compile_variant, expert_shape, training_launches, unique_variants
from kernels.grouped_gemm import config_for

# the opt-in shared-memory per block on A100 (sm_80) and H100 (sm_90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
GEMMS = {"_gg_fwd_kernel", "_gg_dw_kernel"}
ROOT = Path(__file__).resolve().parents[1]


def _jit_kernels() -> set[str]:
    """Every @triton.jit function in kernels/ named *_kernel (helpers such as _find_tile are inlined)."""
    names = set()
    for p in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\n\s*def (\w+_kernel)\(", p.read_text()))
    return names


def _gemm_shapes(size: str) -> list[tuple[str, int, int]]:
    s = expert_shape(size)
    D, F = s["D"], s["F"]
    return [("rows", 2 * F, D), ("rows", D, F), ("rows", D, 2 * F), ("rows", F, D),  # up/down fwd, up/down dX
            ("dw", 2 * F, D), ("dw", D, F)]


def test_every_kernel_is_launched_by_training_or_listed():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "cubin compile tests need the real compiler"
    compiled = {launch.kernel.__name__ for labels, launch in unique_variants(90, "M")}
    assert compiled == _jit_kernels()
    training = {launch.kernel.__name__ for launch in training_launches(90, "M")}
    assert _jit_kernels() - training == {"_dgates_kernel"}  # the D-side gate gradient: megablocks backend only


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cc", [80, 90])
def test_gemm_tiles_fit_the_real_widths(size, cc):
    """Every GEMM's tiles pad N and Kd by at most 12.5% (N = 192 gets no 25% masked columns), the pipeline
    depth never exceeds the K steps, shared memory fits, and the launches use exactly config_for's tiles."""
    for op, N, KD in _gemm_shapes(size):
        c = config_for(op, N, KD, cc)
        for extent, block in ((N, c.BN), (KD, c.BK)):
            padded = cdiv(extent, block) * block
            assert (padded - extent) / padded <= 0.125, (size, op, N, KD, c)
        steps = cdiv(KD, c.BK) if op == "rows" else None
        if steps is not None:
            assert 2 <= c.num_stages <= max(2, steps), (size, op, N, KD, c)
        per_stage = (c.BM * c.BK + c.BK * c.BN) * 2 if op == "rows" else (c.BN * c.BM + c.BM * c.BK) * 2
        assert c.num_stages * per_stage <= SMEM_LIMIT[cc], (size, op, N, KD, c)
    n = 0
    for launch in training_launches(cc, size):
        if launch.kernel.__name__ not in GEMMS:
            continue
        n += 1
        N, KD = launch.args[5], launch.args[6]
        c = config_for("rows" if launch.kernel.__name__ == "_gg_fwd_kernel" else "dw", N, KD, cc)
        k = launch.constexprs
        assert (k["BM"], k["BN"], k["BK"], launch.num_warps, launch.num_stages) == \
            (c.BM, c.BN, c.BK, c.num_warps, c.num_stages), launch.label
        assert k["UPCAST"] is False and launch.args[0].dtype.is_floating_point
    assert n == 6  # up fwd (gathered), down fwd, both dX, both dW


def _cases():
    out = [("M", cc, "all") for cc in (80, 90)]
    # S and L: every kernel a training step launches (their routing / permute / router variants differ from M's
    # in E_PAD, K and the F-side column tile); M also compiles the megablocks-only extras
    out += [(size, cc, "train") for size in SIZES if size != "M" for cc in (80, 90)]
    return out


@pytest.mark.parametrize("size,cc,which", _cases())
def test_training_kernels_compile_to_cubin(size, cc, which):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "cubin compile tests need the real compiler"
    lines = []
    for labels, launch in unique_variants(cc, size, extra=which == "all"):
        fn = launch.kernel.__name__
        info = compile_variant(launch, cc)
        name = f"sm_{cc} {size} {'; '.join(labels)}"
        assert info["cubin_bytes"] > 1000 and info["target_ok"], name
        assert 0 < info["regs"] == info["regs_ptxas"], (name, info["regs"], info["regs_ptxas"])
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
        assert info["shared_bytes"] <= SMEM_LIMIT[cc], (name, info["shared_bytes"])
        if fn in GEMMS:  # tensor-core code: mma.sync on sm_80, wgmma on sm_90
            assert info["wgmma"] if cc == 90 else (info["mma_sync"] and not info["wgmma"]), name
            assert launch.args[0].dtype.itemsize == 2 and info["shared_bytes"] > 0, name
        lines.append(f"{name}: {info['regs']} regs, {info['shared_bytes']} B shared, {launch.num_warps} warps, "
                     f"{launch.num_stages} stages")
    assert lines
    print("\n".join(lines))
