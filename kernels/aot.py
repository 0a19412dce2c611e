"""Ahead-of-time compile of every Triton kernel at its real launch configuration (no GPU needed).

`launch_plans(cc)` builds the launch plans the ops use at run time for a bf16 MoE layer (the model's dtype on
GPU) at the S preset's layer shape, including both directions of every kernel (forward, backward variants and
each constexpr specialisation the autograd path launches). `python -m kernels.aot` compiles them for sm_80 and
sm_90 and prints shared memory, registers-independent metadata and whether sm_90 used wgmma.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernels._triton_util import Launch, compile_launch


def launch_plans(cc: int, T: int = 512, D: int = 1280, F: int = 160, E: int = 64, K: int = 6,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, Launch]:
    from kernels import grouped_gemm as gg  # noqa: PLC0415
    from kernels import permute as pm  # noqa: PLC0415
    from kernels.router_triton import plan_route  # noqa: PLC0415
    from kernels.routing import plan_routing, routing_reference  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)  # the router runs in fp32
    plans: dict[str, Launch] = {}
    _, plans["router_softmax_norm"] = plan_route(logits, K, "softmax", True, None)
    _, plans["router_sigmoid_bias"] = plan_route(logits, K, "sigmoid", True, torch.zeros(E))
    ids = torch.randint(0, E, (T, K), generator=g)
    _, (plans["routing_hist"], plans["routing_scan"], plans["routing_scatter"]) = plan_routing(ids, E)
    r = routing_reference(ids, E)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = torch.randn(E, 2 * F, D, generator=g).to(dtype)
    w2 = torch.randn(E, D, F, generator=g).to(dtype)
    S = T * K
    h = torch.randn(S, F, generator=g).to(dtype)
    y = torch.randn(S, D, generator=g).to(dtype)
    gates = torch.rand(T, K, generator=g).to(dtype)
    _, plans["permute_gather"] = pm.plan_gather(x, r.perm_S, K)
    _, plans["combine_bwd_scaled_gather"] = pm.plan_gather(x, r.perm_S, K, scale=gates)
    _, plans["combine_weighted"] = pm.plan_combine(y, r.inv_S, K, gates)
    _, plans["combine_unweighted"] = pm.plan_combine(y, r.inv_S, K, None)
    _, plans["combine_dgates"] = pm.plan_dgates(x, y, r.inv_S, K)
    _, plans["gg_fwd_gather_up"] = gg.plan_gg_fwd(x, w13, r.offsets_E1, r.perm_S, K, True, cc=cc)
    _, plans["gg_fwd_down"] = gg.plan_gg_fwd(h, w2, r.offsets_E1, None, 1, True, cc=cc)
    _, plans["gg_bwd_dx_up"] = gg.plan_gg_fwd(torch.randn(S, 2 * F).to(dtype), w13, r.offsets_E1, None, 1, False, cc=cc)
    _, plans["gg_bwd_dx_down"] = gg.plan_gg_fwd(y, w2, r.offsets_E1, None, 1, False, cc=cc)
    _, plans["gg_bwd_dw_up_gather"] = gg.plan_gg_dw(x, torch.randn(S, 2 * F).to(dtype), r.offsets_E1,
                                                    tuple(w13.shape), r.perm_S, K, cc=cc)
    _, plans["gg_bwd_dw_down"] = gg.plan_gg_dw(h, y, r.offsets_E1, tuple(w2.shape), None, 1, cc=cc)
    return plans


def compile_all(ccs=(80, 90)) -> list[dict]:
    rows = []
    for cc in ccs:
        for name, launch in launch_plans(cc).items():
            ck = compile_launch(launch, cc)
            ttgir = ck.asm["ttgir"]
            rows.append(dict(kernel=name, triton_fn=launch.kernel.__name__, cc=cc, shared_bytes=int(ck.metadata.shared),
                             num_warps=launch.num_warps, num_stages=launch.num_stages, cubin_bytes=len(ck.asm["cubin"]),
                             wgmma="warp_group_dot" in ttgir or "wgmma" in ck.asm["ptx"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    a = ap.parse_args(argv)
    try:
        ccs = tuple(int(c) for c in a.cc.split(","))
    except ValueError:
        print(f"error: --cc must be comma-separated integers, got {a.cc!r}", file=sys.stderr)
        return 2
    print("| kernel | triton fn | sm | shared mem (B) | warps | stages | cubin (B) | wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    for r in compile_all(ccs):
        print(f"| {r['kernel']} | {r['triton_fn']} | {r['cc']} | {r['shared_bytes']} | {r['num_warps']} | "
              f"{r['num_stages']} | {r['cubin_bytes']} | {'yes' if r['wgmma'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
