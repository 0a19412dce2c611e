"""Every Triton kernel compiles to cubin for sm_80 and sm_90 at its real launch configuration (bf16).

No GPU needed: triton.compile with ASTSource + GPUTarget. The launch plans come from the same planning
functions the ops use at run time (kernels/aot.py), specialised like the JIT launcher does. Must run WITHOUT
TRITON_INTERPRET (the interpreter replaces the compiler); the interpreter tests run in their own process.
"""

from __future__ import annotations

import os

import pytest

from kernels._triton_util import compile_launch
from kernels.aot import launch_plans

# the opt-in shared-memory per block on A100 (sm_80) and H100 (sm_90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("cc", [80, 90])
def test_every_kernel_compiles_to_cubin(cc):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "cubin compile tests need the real compiler"
    plans = launch_plans(cc)
    fns = {p.kernel.__name__ for p in plans.values()}
    # every @triton.jit kernel in kernels/ is covered (the helper _find_tile is inlined into the GEMMs)
    assert fns == {"_router_fwd_kernel", "_hist_kernel", "_scan_kernel", "_scatter_kernel", "_gather_kernel",
                   "_combine_kernel", "_dgates_kernel", "_gg_fwd_kernel", "_gg_dw_kernel"}
    lines = []
    for name, launch in plans.items():
        ck = compile_launch(launch, cc)
        assert len(ck.asm["cubin"]) > 1000, name
        shared = int(ck.metadata.shared)
        assert shared <= SMEM_LIMIT[cc], (name, shared)
        if name.startswith("gg_"):
            assert f".target sm_{cc}" in ck.asm["ptx"], name
            # the grouped GEMMs are tensor-core code: mma.sync on sm_80, wgmma on sm_90
            assert ("wgmma" in ck.asm["ptx"]) if cc == 90 else ("mma.sync" in ck.asm["ptx"]), name
            assert shared > 0, name
        lines.append(f"sm_{cc} {name}: shared {shared} B, {launch.num_warps} warps, {launch.num_stages} stages")
    print("\n".join(lines))
