"""Ahead-of-time compile of exactly the Triton kernel variants a training step launches (no GPU needed).

`training_launches(cc, size)` runs the training ops themselves on CPU tensors under
`kernels._triton_util.record_launches(cc)`: the router (route_triton, forward) and the routed experts
(moe_experts_triton, forward + backward) at the expert shapes of `model.config.get_config(size)`, with the dtypes
the model's CUDA precision policy feeds them (x, w_gate_up, w_down bf16; router logits and gates fp32). Every
Launch they make is recorded instead of run, planned for compute capability `cc` through the same tile tables
(`config_for` / `pick_block`) the run-time path uses, and specialised the way triton's JIT launcher does it.
Launches that share a binary (same kernel, signature, constexprs, divisibility, warps, stages) are merged.
`extra_launches` adds the kernels only the optional megablocks backend launches (the D-side weighted combine).

`python -m kernels.aot --size S|M|L` compiles them for sm_80 and sm_90 and prints, per variant, registers,
spill bytes, shared memory and whether the sm_90 code uses wgmma (ttgir warp_group_dot / ptx wgmma) and the
sm_80 code mma.sync. The token count is one sequence of cfg.max_seq_len tokens: only divisibility by 16 of the
sizes and strides reaches the compiled code, and every training micro-batch (micro_batch x seq_len) shares it.
"""

from __future__ import annotations

import sys

import torch

from kernels._triton_util import Launch, compile_launch, record_launches, resource_usage, variant_key
from model import cli  # torch-free CLI conventions (exit codes, help defaults)

SIZES = ("S", "M", "L")


def expert_shape(size: str) -> dict:
    from model.config import get_config  # noqa: PLC0415

    c = get_config(size)
    return dict(T=c.max_seq_len, D=c.d_model, F=c.expert_ffn_dim, E=c.n_experts, K=c.top_k, score=c.router_score,
                norm=bool(c.norm_topk_prob), bias=c.router_bias_coeff > 0)


def training_launches(cc: int, size: str = "S") -> list[Launch]:
    """Every launch of one MoE layer's training step (router forward; experts forward + backward), in order."""
    from kernels.moe_triton import moe_experts_triton  # noqa: PLC0415
    from kernels.router_triton import route_triton  # noqa: PLC0415

    s = expert_shape(size)
    T, D, F, E, K = s["T"], s["D"], s["F"], s["E"], s["K"]
    bf16 = torch.bfloat16
    # values are never read while recording (every plan is sized as on a GPU, without host syncs), so the
    # inputs are uninitialised: only their shapes, dtypes and strides reach the launches
    with record_launches(cc) as rec:
        logits = torch.empty(T, E, requires_grad=True)
        route_triton(logits, K, s["score"], s["norm"], torch.zeros(E) if s["bias"] else None)
        ids = torch.zeros(T, K, dtype=torch.int64)  # int64, as the router returns them
        x = torch.empty(T, D, dtype=bf16, requires_grad=True)
        gates = torch.empty(T, K, requires_grad=True)  # fp32, as the model's router hands them over
        w13 = torch.empty(E, 2 * F, D, dtype=bf16, requires_grad=True)
        w2 = torch.empty(E, D, F, dtype=bf16, requires_grad=True)
        y = moe_experts_triton(x, ids, gates, w13, w2)
        y.backward(torch.empty_like(y))
    return list(rec)


def extra_launches(cc: int, size: str = "S") -> list[Launch]:
    """The D-side weighted combine and its gate gradient: launched only by the optional megablocks backend."""
    from kernels import permute as pm  # noqa: PLC0415
    from kernels.routing import routing_reference  # noqa: PLC0415

    s = expert_shape(size)
    T, D, E, K = s["T"], s["D"], s["E"], s["K"]
    r = routing_reference(torch.zeros(T, K, dtype=torch.int64), E)
    y = torch.empty(T * K, D, dtype=torch.bfloat16)
    gates = torch.empty(T, K, dtype=torch.bfloat16)  # megablocks_adapter rounds the gates to y's dtype
    with record_launches(cc) as rec:
        for _, launch in (pm.plan_combine(y, r.inv_S, K, gates), pm.plan_dgates(y[:T], y, r.inv_S, K)):
            launch.label = "megablocks: " + launch.label
            launch.run()
    return list(rec)


def unique_variants(cc: int, size: str = "S", extra: bool = True) -> list[tuple[list[str], Launch]]:
    """[(labels of the launches sharing it, one Launch)] per distinct binary, in first-launch order."""
    out: dict = {}
    for launch in training_launches(cc, size) + (extra_launches(cc, size) if extra else []):
        key = variant_key(launch, cc)
        if key not in out:
            out[key] = ([], launch)
        label = launch.label or launch.kernel.__name__.strip("_")
        if label not in out[key][0]:
            out[key][0].append(label)
    return list(out.values())


_compiled: dict = {}


def compile_variant(launch: Launch, cc: int) -> dict:
    """Compile (cached per binary) and describe one variant."""
    key = variant_key(launch, cc)
    if key not in _compiled:
        ck = compile_launch(launch, cc)
        ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
        _compiled[key] = dict(ck=ck, cubin_bytes=len(ck.asm["cubin"]), shared_bytes=int(ck.metadata.shared),
                              wgmma="warp_group_dot" in ttgir or "wgmma" in ptx, mma_sync="mma.sync" in ptx,
                              target_ok=f".target sm_{cc}" in ptx, **resource_usage(ck, cc))
    return _compiled[key]


def compile_all(ccs=(80, 90), size: str = "S") -> list[dict]:
    rows = []
    for cc in ccs:
        for labels, launch in unique_variants(cc, size):
            info = compile_variant(launch, cc)
            rows.append(dict(kernel="; ".join(labels), triton_fn=launch.kernel.__name__, cc=cc, size=size,
                             num_warps=launch.num_warps, num_stages=launch.num_stages,
                             constexprs=dict(launch.constexprs), **{k: v for k, v in info.items() if k != "ck"}))
    return rows


def _tiles_str(c: dict) -> str:
    keys = ("BM", "BN", "BK", "GROUP_M", "BS", "BT", "BD", "BLOCK", "CB", "BE", "E_PAD")
    return " ".join(f"{k}={c[k]}" for k in keys if k in c)


def main(argv=None) -> int:
    ap = cli.parser("python -m kernels.aot", __doc__.splitlines()[0])
    ap.add_argument("--size", default="S", help=f"model preset whose expert shapes are compiled: {cli.choices(SIZES)}")
    ap.add_argument("--cc", default="80,90", help="compute capabilities, comma separated")
    a = ap.parse_args(argv)
    if a.size not in SIZES:
        print(f"error: --size must be one of {'|'.join(SIZES)}, got {a.size!r}", file=sys.stderr)
        return 2
    try:
        ccs = tuple(int(c) for c in a.cc.split(","))
    except ValueError:
        print(f"error: --cc must be comma-separated integers, got {a.cc!r}", file=sys.stderr)
        return 2
    if any(c < 80 for c in ccs):
        print(f"error: --cc values must be >= 80 (sm_80 / sm_90 targets), got {a.cc!r}", file=sys.stderr)
        return 2
    s = expert_shape(a.size)
    print(f"size {a.size}: D={s['D']} F={s['F']} E={s['E']} top-{s['K']}, T={s['T']} tokens, bf16 operands, "
          f"fp32 accumulate, fp32 router/gates")
    print("| launch(es) | triton fn | sm | tiles | warps | stages | regs | spill B (st/ld) | shared B | tensor cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in compile_all(ccs, a.size):
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "-")
        print(f"| {r['kernel']} | {r['triton_fn']} | {r['cc']} | {_tiles_str(r['constexprs'])} | {r['num_warps']} | "
              f"{r['num_stages']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {tc} |")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
