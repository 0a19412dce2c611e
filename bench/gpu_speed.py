"""bench.gpu speed sections: one M-shaped training step (+ dtype probe), the MoE layer, each grouped GEMM.

FLOPs are 2 x multiply-adds of the useful work only (padding and gathers are free): a layer forward is
2 * 3 * T*K * D*F (three expert matrices), fwd+bwd three times that. Baselines read a pre-permuted copy of
the token rows where the Triton GEMM gathers them in the kernel (the gather itself is not timed for them).
"""

from __future__ import annotations

import time

import torch

SHAPES = ("S", "M", "L")


def _shape(name: str, dry: bool) -> dict:
    from model.config import get_config  # noqa: PLC0415

    c = get_config(name)
    if dry:  # same structure, tiny sizes (one or two interpreter tiles per GEMM)
        return dict(name=name, D=32, F=16, E=4, K=2)
    return dict(name=name, D=c.d_model, F=c.expert_ffn_dim, E=c.n_experts, K=c.top_k)


def _tokens(dry: bool) -> tuple[int, ...]:
    return (24,) if dry else (16384, 65536)


def _reps(ctx) -> int:
    return 1 if ctx.dry else 10


def _megablocks():
    try:
        import megablocks  # noqa: F401, PLC0415
        from grouped_gemm import ops  # noqa: PLC0415

        return ops
    except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA extension)
        return None


def _timed(ctx, fn, flops: float) -> dict:
    try:
        ms = ctx.time_ms(fn, _reps(ctx), warmup=0 if ctx.dry else 2)
    except Exception as e:  # noqa: BLE001  (an unsupported baseline: reported, the sweep goes on)
        return dict(ms=None, tflops=None, pct_dense=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    tf = flops / (ms * 1e-3) / 1e12
    return dict(ms=ms, tflops=tf, pct_dense=100 * tf / ctx.dense_tflops if ctx.dense_tflops else None, error=None)


# ---------------------------------------------------------------------------------------------- MoE layer
def layer_speed(ctx) -> list[dict]:
    from bench.gpu_checks import _layer_inputs  # noqa: PLC0415
    from kernels.moe import moe_experts, moe_experts_reference  # noqa: PLC0415

    impls = {"triton": lambda *a: moe_experts(*a, backend="triton"),
             "torch._grouped_mm": (lambda *a: moe_experts_reference(*a, method="grouped_mm"))
             if hasattr(torch, "_grouped_mm") else None,
             "per-expert torch.mm": lambda *a: moe_experts_reference(*a, method="slices"),
             "megablocks": (lambda *a: moe_experts(*a, backend="megablocks"))
             if ctx.device.type == "cuda" and _megablocks() else None}
    rows = []
    for name in SHAPES:
        sh = _shape(name, ctx.dry)
        for T in _tokens(ctx.dry):
            if ctx.over_budget():
                ctx.skipped.append(("layer", f"{name} T={T}", "time budget"))
                continue
            D, F, E, K = sh["D"], sh["F"], sh["E"], sh["K"]
            x, ids, gates, w13, w2, dy = _layer_inputs(T, D, F, E, K, ctx.device, 7, ctx.lp)
            leaves = [t.requires_grad_(True) for t in (x, gates, w13, w2)]
            fl = 2 * 3 * T * K * D * F
            row = dict(shape=name, T=T, D=D, F=F, E=E, K=K, fwd={}, fwd_bwd={})
            for impl, fn in impls.items():
                if fn is None:
                    why = "not in this torch" if impl == "torch._grouped_mm" else "not importable"
                    row["fwd"][impl] = row["fwd_bwd"][impl] = dict(ms=None, tflops=None, pct_dense=None, error=why)
                    continue

                def fwd(fn=fn, leaves=leaves, ids=ids):
                    with torch.no_grad():
                        fn(leaves[0], ids, *leaves[1:])

                def fwd_bwd(fn=fn, leaves=leaves, ids=ids, dy=dy):
                    for t in leaves:
                        t.grad = None
                    fn(leaves[0], ids, *leaves[1:]).backward(dy)

                row["fwd"][impl] = _timed(ctx, fwd, fl)
                row["fwd_bwd"][impl] = _timed(ctx, fwd_bwd, 3 * fl)
            rows.append(row)
            tri = row["fwd_bwd"]["triton"]
            ctx.log(f"layer {name} T={T}: fwd+bwd " + ", ".join(
                f"{k} {v['tflops']:.1f}" if v["tflops"] else f"{k} -" for k, v in row["fwd_bwd"].items())
                + f" TFLOP/s (triton {tri['pct_dense'] or 0:.0f}% of dense)")
    return rows


# ---------------------------------------------------------------------------------------------- grouped GEMMs
def _loop_gemm(bounds, a, w, out, mode):
    """Per-expert torch.mm: mode fwd Y = A_e W_e^T, dx Y = A_e W_e, dw Y_e = dY_e^T X_e (a = (dY, X))."""
    lo = 0
    for e, hi in enumerate(bounds):
        if hi > lo:
            if mode == "fwd":
                torch.mm(a[lo:hi], w[e].t(), out=out[lo:hi])
            elif mode == "dx":
                torch.mm(a[lo:hi], w[e], out=out[lo:hi])
            else:
                torch.mm(a[0][lo:hi].t(), a[1][lo:hi], out=out[e])
        lo = hi


def _grouped_mm_row(ctx, a, w, mode, offs, fl) -> dict:
    """torch._grouped_mm on the operands as they are; if this torch / GPU rejects their layout, once more on
    copies in the other memory order (made outside the timed region, and said so in the row)."""
    if mode == "fwd":
        variants = [lambda: (a, w.transpose(1, 2)), lambda: (a, w.contiguous().transpose(1, 2).contiguous())]
    elif mode == "dx":
        variants = [lambda: (a, w), lambda: (a, w.transpose(1, 2).contiguous().transpose(1, 2))]
    else:  # dW_e = dY_e^T X_e: offs split the shared reduction dimension
        variants = [lambda: (a[0].t(), a[1]), lambda: (a[0].t().contiguous(), a[1])]
    first = None
    for i, make in enumerate(variants):
        p, q = make()
        r = _timed(ctx, lambda p=p, q=q: torch._grouped_mm(p, q, offs=offs), fl)
        if r["error"] is None:
            if i:
                r["error"] = f"on relaid-out copies (as given: {first})"
            return r
        first = first or r["error"]
    return r


def gemm_speed(ctx) -> list[dict]:
    from bench.gpu_checks import _topk_ids  # noqa: PLC0415
    from kernels.grouped_gemm import plan_gg_dw, plan_gg_fwd  # noqa: PLC0415
    from kernels.routing import routing_triton  # noqa: PLC0415

    mb = _megablocks() if ctx.device.type == "cuda" else None
    has_gmm = hasattr(torch, "_grouped_mm")
    rows = []
    for name in SHAPES:
        sh = _shape(name, ctx.dry)
        D, F, E, K = sh["D"], sh["F"], sh["E"], sh["K"]
        for T in _tokens(ctx.dry):
            if ctx.over_budget():
                ctx.skipped.append(("gemm", f"{name} T={T}", "time budget"))
                continue
            g = torch.Generator().manual_seed(8)
            dev, bf = ctx.device, ctx.lp
            ids = _topk_ids(T, E, K, g, dev)
            r = routing_triton(ids, E)
            S = T * K
            bounds = r.offsets_E1[1:].tolist()
            offs = r.offsets_E1[1:].to(torch.int32)
            sizes = r.counts_E.to("cpu", torch.int64)
            x_TD, w13, w2 = (torch.randn(*s, device=dev, dtype=bf) for s in ((T, D), (E, 2 * F, D), (E, D, F)))
            x_SD = x_TD[r.perm_S.long() // K]  # the baselines' pre-permuted rows
            h_SF, dh_S2F, dy_SD = (torch.randn(*s, device=dev, dtype=bf) for s in ((S, F), (S, 2 * F), (S, D)))
            # op -> (N, Kd, triton plan, (a, w, mode) for the baselines)
            ops = {
                "up fwd (gather)": (2 * F, D, plan_gg_fwd(x_TD, w13, r.offsets_E1, r.perm_S, K), (x_SD, w13, "fwd")),
                "down fwd": (D, F, plan_gg_fwd(h_SF, w2, r.offsets_E1), (h_SF, w2, "fwd")),
                "up dX": (D, 2 * F, plan_gg_fwd(dh_S2F, w13, r.offsets_E1, transpose_w=False), (dh_S2F, w13, "dx")),
                "down dX": (F, D, plan_gg_fwd(dy_SD, w2, r.offsets_E1, transpose_w=False), (dy_SD, w2, "dx")),
                "up dW (gather)": (2 * F, D, plan_gg_dw(x_TD, dh_S2F, r.offsets_E1, tuple(w13.shape), r.perm_S, K),
                                   ((dh_S2F, x_SD), w13, "dw")),
                "down dW": (D, F, plan_gg_dw(h_SF, dy_SD, r.offsets_E1, tuple(w2.shape)), ((dy_SD, h_SF), w2, "dw")),
            }
            for op, (N, KD, (_, launch), (a, w, mode)) in ops.items():
                fl = 2 * S * N * KD
                out = torch.empty(E, N, KD, device=dev, dtype=bf) if mode == "dw" else torch.empty(S, N, device=dev, dtype=bf)
                res = {"triton": _timed(ctx, launch.run, fl)}  # same column order as the layer table
                if has_gmm:
                    res["torch._grouped_mm"] = _grouped_mm_row(ctx, a, w, mode, offs, fl)
                else:
                    res["torch._grouped_mm"] = dict(ms=None, tflops=None, pct_dense=None, error="not in this torch")
                res["per-expert torch.mm"] = _timed(
                    ctx, lambda a=a, w=w, o=out, m=mode, b=bounds: _loop_gemm(b, a, w, o, m), fl)
                if mb is not None and mode != "dw":
                    res["megablocks"] = _timed(ctx, lambda a=a, w=w, t=mode == "fwd", z=sizes: mb.gmm(a, w, z, trans_b=t),
                                               fl)
                else:
                    res["megablocks"] = dict(ms=None, tflops=None, pct_dense=None,
                                             error="not importable" if mb is None else "no dW entry point timed")
                rows.append(dict(shape=name, T=T, op=op, S=S, N=N, Kd=KD, E=E, res=res))
                ctx.log(f"gemm {name} T={T} {op:16s} S={S} N={N} Kd={KD}: " + ", ".join(
                    f"{k} {v['tflops']:.1f}" if v["tflops"] else f"{k} -" for k, v in res.items()) + " TFLOP/s")
    return rows


# ---------------------------------------------------------------------------------------------- training step
# Used only when train.loop cannot be imported (its checkpoint module needs safetensors): the same loss,
# AdamW grouping and nominal peaks as train/loop.py (keep in step with it).
def _forward_loss(model, ids_BT1, mask_BT, device):
    logits = model(ids_BT1[:, :-1].to(device))
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           ids_BT1[:, 1:].to(device).reshape(-1), reduction="none")
    m = mask_BT.to(device).reshape(-1).float()
    return (ce * m).sum(), m.sum()


def _make_optimizer(model, cfg):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=other, weight_decay=0.0)],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def _peak_flops(device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if k in name:
                return v
        return 100e12
    import os  # noqa: PLC0415

    return (os.cpu_count() or 1) * 3e9 * 32


def train_step(ctx) -> dict:
    """One M-shaped model (2 layers) trained for a few steps under the device's precision policy, with a probe
    on kernels.moe.moe_experts (as the model calls it) and on the router's logits."""
    from types import SimpleNamespace  # noqa: PLC0415

    import model.model as mm  # noqa: PLC0415
    from model.config import flops_per_token, get_config  # noqa: PLC0415
    from model.precision import policy_for  # noqa: PLC0415
    try:  # train.loop pulls in train.ckpt -> safetensors, which a bare GPU machine's python may lack
        from train.loop import forward_loss, make_optimizer, peak_flops  # noqa: PLC0415
        step_src = "train.loop (forward_loss, make_optimizer, peak_flops)"
    except ImportError as e:
        forward_loss, make_optimizer, peak_flops = _forward_loss, _make_optimizer, _peak_flops
        step_src = f"bench/gpu_speed.py's copies of train.loop's pieces (train.loop: {e})"

    dev = ctx.device
    if ctx.dry:
        cfg = get_config("tiny", n_layers=2, moe_backend="triton", vocab_size=256, d_model=64, n_heads=2,
                         n_kv_heads=1, ffn_dim=128, n_experts=4, expert_ffn_dim=32, shared_ffn_dim=32)
        B, T, steps, policy = 1, 16, 0, policy_for(dev, "bf16")  # the CPU twin of the CUDA policy
    else:
        cfg = get_config("M", n_layers=2)
        B, T, steps, policy = 8, 2048, 5, policy_for(dev)
    model = mm.MobileMoE(cfg).to(dev)
    model.set_precision(policy)
    model.train()
    opt = make_optimizer(model, SimpleNamespace(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    g = torch.Generator().manual_seed(9)
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(dev)
    mask = torch.ones(B, T)
    probe = dict(calls=[], router_logits=[])
    import kernels.moe as km  # noqa: PLC0415

    real_moe, real_route = mm.moe_experts, mm.route

    def moe_probe(*a, **k):  # kernels.moe.moe_experts(x, ids, gates, w13, w2, backend=..., act_fq=...)
        x, ids, gates, w13, w2 = a[:5]
        probe["calls"].append(dict(x=x.dtype, w13=w13.dtype, w2=w2.dtype, gates=gates.dtype, ids=ids.dtype,
                                   backend=k.get("backend", a[5] if len(a) > 5 else "auto")))
        return real_moe(*a, **k)

    def route_probe(logits, *a, **k):
        probe["router_logits"].append(logits.dtype)
        return real_route(logits, *a, **k)

    def step():
        ce, n = forward_loss(model, batch, mask, dev)
        loss = ce / n + model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        model.update_router_bias()
        return loss

    n = lambda d: str(d).removeprefix("torch.")
    # both names: the model module's import of it and the module attribute (whichever the model calls)
    mm.moe_experts, km.moe_experts, mm.route = moe_probe, moe_probe, route_probe
    try:
        t = time.perf_counter()
        loss0 = float(step().detach())  # also the warm-up (Triton compiles)
        first_ms = 1e3 * (time.perf_counter() - t)
    finally:
        mm.moe_experts, km.moe_experts, mm.route = real_moe, real_moe, real_route
    grad_dtypes = {n(p.grad.dtype) for p in model.parameters() if p.grad is not None}
    param_dtypes = {n(p.dtype) for p in model.parameters()}
    # the dry run times its one (probed, interpreted) step: a second one would only repeat it
    ms = first_ms if ctx.dry else ctx.time_ms(step, steps, warmup=1)
    tok_s = B * T / (ms * 1e-3)
    ftok = 3 * flops_per_token(cfg, T)  # fwd + bwd, train/loop.py's MFU convention
    achieved = ftok * tok_s
    calls = [{k: n(v) if isinstance(v, torch.dtype) else v for k, v in c.items()} for c in probe["calls"]]
    want = dict(x="bfloat16", w13="bfloat16", w2="bfloat16", gates="float32")
    ok = (bool(calls) and all(all(c[k] == v for k, v in want.items()) for c in calls)
          and all(d == torch.float32 for d in probe["router_logits"]) and bool(probe["router_logits"]))
    res = dict(config=f"M-shaped, n_layers={cfg.n_layers}" if not ctx.dry else "tiny, n_layers=2 (dry run)",
               d_model=cfg.d_model, n_experts=cfg.n_experts, top_k=cfg.top_k, vocab=cfg.vocab_size,
               batch=B, seq_len=T, tokens_per_step=B * T, steps_timed=steps, step_ms=ms, tokens_per_s=tok_s,
               flops_per_token_fwd_bwd=ftok, achieved_tflops=achieved / 1e12,
               mfu_vs_measured_dense=achieved / (ctx.dense_tflops * 1e12) if ctx.dense_tflops else None,
               mfu_vs_nominal_peak=achieved / peak_flops(dev), nominal_peak_tflops=peak_flops(dev) / 1e12,
               policy=policy.describe(), first_loss=loss0, step_code=step_src,
               probe=dict(moe_experts_calls=calls, router_logits=[n(d) for d in probe["router_logits"]],
                          param_dtypes=sorted(param_dtypes), grad_dtypes=sorted(grad_dtypes), passed=ok,
                          want="x / w13 / w2 bfloat16, gates float32, router logits float32"))
    ctx.log(f"train step ({res['config']}, {B}x{T} tokens): {ms:.1f} ms, {tok_s:.0f} tok/s, "
            f"MFU {100 * (res['mfu_vs_measured_dense'] or 0):.1f}% of measured dense; dtype probe "
            f"{'PASS' if ok else 'FAIL'}: {calls[:1]}, router logits {res['probe']['router_logits'][:1]}")
    return res
