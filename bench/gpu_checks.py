"""bench.gpu correctness checks: every Triton kernel in bf16 against an fp32 reference of the same values.

The fp32 reference reads the bf16 inputs upcast, so an error measures the kernel alone (fp32 accumulation,
one bf16 rounding per GEMM output and of the gate product), not the input rounding. Errors are normwise,
||got - ref|| / ||ref||. One bf16 rounding costs ~3e-3 of that (measured), so a single grouped GEMM must be
within GEMM_TOL = 1e-2. A whole layer rounds h, silu(g) * u, the gate product, y and the combine, ~1e-2 in
all, so its bound is relative to PyTorch's own bf16 path over the same rounding points
(moe_experts_reference on the bf16 values): Triton may be at most 1.5x that error + 1e-3, and never above
LAYER_CAP = 3e-2. Integer outputs (routing, router ids) and the determinism check must be exact.

The dry run (CPU interpreter) uses fp16 where the GPU uses bf16 (ctx.lp): the interpreter converts fp32 to
bf16 by truncation, not round-to-nearest, which doubles and biases every rounding (a layer comes out ~3x
PyTorch's bf16 error), while its fp16 matches PyTorch's fp16 bit for bit.
"""

from __future__ import annotations

import torch

GEMM_TOL = 1e-2
LAYER_CAP = 3e-2


def _sizes(dry: bool) -> dict:
    if dry:  # tiny, but several routing blocks / GEMM tiles under the interpreter
        return dict(route_T=150, route_E=8, route_K=2, T=40, D=32, F=16, E=6, K=2, det_T=24,
                    big=dict(T=40, D=32, F=16, E=4, K=2))
    # M shapes (D 1536, F 192, E 96, K 8); int64: T x D > 2^31 at D 2048 (and S x D = 2 T x D for y_SD)
    return dict(route_T=65531, route_E=96, route_K=8, T=8192, D=1536, F=192, E=96, K=8, det_T=16384,
                big=dict(T=(1 << 31) // 2048 + 8192, D=2048, F=64, E=8, K=2))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _topk_ids(T: int, E: int, K: int, g: torch.Generator, device, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """K distinct ids per token, uniform, never choosing the experts in `empty`."""
    if K > E - len(empty):
        raise ValueError(f"{K} distinct ids from {E} experts with {len(empty)} kept empty")
    r = torch.rand(T, E, generator=g)
    if empty:
        r[:, list(empty)] = -1.0
    return r.topk(K, dim=1).indices.to(device)


def _result(name: str, passed: bool, detail: str, err: float | None = None, tol: float | None = None) -> dict:
    return dict(name=name, passed=bool(passed), detail=detail, err=err, tol=tol)


def check_routing(ctx, s) -> list[dict]:
    from kernels.routing import routing_reference, routing_triton  # noqa: PLC0415

    T, E, K = s["route_T"], s["route_E"], s["route_K"]
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    cases = {"random": _topk_ids(T, E, K, g, ctx.device),
             "skewed": torch.multinomial(zipf.float(), T * K, replacement=True, generator=g).view(T, K).to(ctx.device),
             "all-to-one": torch.full((T, K), E - 1, dtype=torch.int64, device=ctx.device)}
    out = []
    for name, ids in cases.items():
        got, ref = routing_triton(ids, E), routing_reference(ids, E)
        bad = [f for f in ("counts_E", "offsets_E1", "perm_S", "inv_S")
               if not torch.equal(getattr(got, f).long().cpu(), getattr(ref, f).long().cpu())]
        out.append(_result(f"routing {name}", not bad, f"T={T} E={E} K={K}: " +
                           ("counts, offsets, perm, inv exactly equal" if not bad else f"differ: {', '.join(bad)}")))
    return out


def _same_selection(ids, rids, rscores, bias, special) -> tuple[bool, int]:
    """ids == the reference's, except that two experts whose selection scores agree to ~1e-6 (a few ulp of a
    GPU's approximate exp and divide; scores are <= 1, the bias is added identically) may come in either order.
    The NaN / inf rows must match exactly."""
    sel = rscores if bias is None else rscores + bias.cpu().float()
    sel = torch.where(torch.isnan(sel), float("-inf"), sel)
    rows = (ids != rids).any(1).nonzero().flatten()
    if any(int(r) in special for r in rows):
        return False, len(rows)
    a, b = sel.gather(1, ids[rows]), sel.gather(1, rids[rows])
    tied = (a == b) | ((a - b).abs() <= 1e-6 * b.abs() + 1e-7)
    return bool(tied.all()), len(rows)


def check_router(ctx, s) -> list[dict]:
    from kernels.router import route_reference  # noqa: PLC0415
    from kernels.router_triton import route_triton  # noqa: PLC0415

    T, E, K = s["route_T"], s["route_E"], s["route_K"]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(T, E, generator=g)
    nan, inf = float("nan"), float("inf")
    logits[0] = nan                      # all NaN
    logits[1, 3] = nan                   # one NaN
    logits[2] = -inf                     # all -inf
    logits[3, 5] = inf                   # one +inf
    logits[4, :: 2] = nan                # half NaN
    logits[T - 1] = nan                  # the last row, in the last program
    bias = torch.randn(E, generator=g) * 0.01
    out = []
    for score, b, dt in (("softmax", None, torch.float32), ("sigmoid", bias, torch.float32),
                         ("softmax", bias, torch.bfloat16)):
        x = logits.to(ctx.device, dt)
        bb = None if b is None else b.to(ctx.device)
        ids, gates, scores = route_triton(x, K, score, True, bb)
        rids, rgates, rscores = route_reference(x, K, score, True, bb)
        ids_c = ids.cpu()
        in_range = bool(((ids_c >= 0) & (ids_c < E)).all())
        distinct = bool((ids_c.sort(1).values.diff(dim=1) != 0).all()) if K > 1 else True
        same_ids, n_swapped = _same_selection(ids_c, rids.cpu(), rscores.cpu(), bb, special=(0, 1, 2, 3, 4, T - 1))
        g_ok = torch.allclose(gates.cpu(), rgates.cpu(), rtol=1e-5, atol=1e-6, equal_nan=True)
        s_ok = torch.allclose(scores.cpu(), rscores.cpu(), rtol=1e-5, atol=1e-6, equal_nan=True)
        nan_rows_nan = bool(gates[0].isnan().all()) if score == "softmax" else True  # NaN propagates to gates
        ok = in_range and distinct and same_ids and g_ok and s_ok and nan_rows_nan
        out.append(_result(f"router {score}{' +bias' if b is not None else ''} {str(dt).removeprefix('torch.')} "
                           "logits, NaN/inf rows", ok,
                           f"T={T} E={E} K={K}: ids in [0,E) {in_range}, distinct {distinct}, ids == reference "
                           f"{same_ids} ({n_swapped} rows with near-tied scores ordered differently), gates {g_ok}, "
                           f"scores {s_ok}, NaN row -> NaN gates {nan_rows_nan}"))
    return out


def check_grouped_gemm(ctx, s) -> list[dict]:
    from kernels.grouped_gemm import (  # noqa: PLC0415
        grouped_gemm_backward_reference,
        grouped_gemm_reference,
        grouped_gemm_triton,
    )
    from kernels.routing import routing_triton  # noqa: PLC0415

    T, D, F, E, K = s["T"], s["D"], s["F"], s["E"], s["K"]
    dev, bf = ctx.device, ctx.lp
    g = torch.Generator().manual_seed(3)
    empty = (0, E // 2, E - 1)
    ids = _topk_ids(T, E, K, g, dev, empty)
    r = routing_triton(ids, E)
    S = T * K
    mk = lambda *shape: (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dev, bf)
    out = []
    # up projection: gathers token rows in the kernel; down projection: sorted rows in, sorted rows out
    for name, x, w, gather in (("up (gathered)", mk(T, D), mk(E, 2 * F, D), True),
                               ("down", mk(S, F), mk(E, D, F), False)):
        x.requires_grad_(True)
        w.requires_grad_(True)
        perm, inv = (r.perm_S, r.inv_S) if gather else (None, None)
        y = grouped_gemm_triton(x, w, r.offsets_E1, perm, inv, K if gather else 1)
        dy = mk(S, w.shape[1])
        y.backward(dy)
        xf, wf = x.detach().float(), w.detach().float()
        y_ref = grouped_gemm_reference(xf, wf, r.offsets_E1, perm, K if gather else 1)
        dx_ref, dw_ref = grouped_gemm_backward_reference(xf, wf, r.offsets_E1, dy.float(), perm, inv,
                                                         K if gather else 1)
        dims = f"S={S} N={w.shape[1]} Kd={w.shape[2]} E={E} ({len(empty)} empty)"
        for what, got, ref in (("fwd", y, y_ref), ("dX", x.grad, dx_ref), ("dW", w.grad, dw_ref)):
            e = _rel(got, ref)
            ok = e < GEMM_TOL and got.dtype == bf
            out.append(_result(f"grouped GEMM {name} {what}", ok, f"{dims}, out {str(got.dtype).removeprefix('torch.')}",
                               e, GEMM_TOL))
        zero = bool((w.grad[list(empty)] == 0).all())
        out.append(_result(f"grouped GEMM {name} dW of empty experts", zero,
                           f"experts {list(empty)}: dW exactly zero {zero}"))
    return out


def _layer_inputs(T, D, F, E, K, dev, seed, dtype, empty=()):
    g = torch.Generator().manual_seed(seed)
    ids = _topk_ids(T, E, K, g, dev, empty)
    gates = torch.rand(T, K, generator=g).softmax(-1).to(dev)  # fp32, as the router gives them
    mk = lambda *shape: (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dev, dtype)
    return mk(T, D), ids, gates, mk(E, 2 * F, D), mk(E, D, F), mk(T, D)


def _fwd_bwd(x, ids, gates, w13, w2, dy, fn):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, w13, w2)]
    y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


NAMES = ("y", "dx", "dgates", "dw13", "dw2")


def _layer_bound(got, ref32, refbf, names) -> tuple[bool, float, float, str]:
    """Triton's error vs fp32 within 1.5x PyTorch's in the same low precision + 1e-3 (and LAYER_CAP)."""
    ok, worst, tol, parts = True, None, None, []
    for n, a, r, b in zip(names, got, ref32, refbf):
        e, eb = _rel(a, r), _rel(b, r)
        t = min(1.5 * eb + 1e-3, LAYER_CAP)
        ok &= e <= t
        if worst is None or e / t > worst / tol:  # report the tensor closest to its bound
            worst, tol = e, t
        parts.append(f"{n} {e:.1e} (torch {eb:.1e}, {str(a.dtype).removeprefix('torch.')})")
    return ok, worst, tol, ", ".join(parts)


def check_layer(ctx, s) -> list[dict]:
    from kernels.moe import moe_experts, moe_experts_reference  # noqa: PLC0415

    T, D, F, E, K = s["T"], s["D"], s["F"], s["E"], s["K"]
    x, ids, gates, w13, w2, dy = _layer_inputs(T, D, F, E, K, ctx.device, 4, ctx.lp, empty=(1, E - 2))
    got = _fwd_bwd(x, ids, gates, w13, w2, dy, lambda *a: moe_experts(*a, backend="triton"))
    refbf = _fwd_bwd(x, ids, gates, w13, w2, dy, moe_experts_reference)
    f32 = [t.float() for t in (x, gates, w13, w2)]
    ref = _fwd_bwd(f32[0], ids, f32[1], f32[2], f32[3], dy.float(), moe_experts_reference)
    ok, err, tol, detail = _layer_bound(got, ref, refbf, NAMES)
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in zip(NAMES, got)}
    lp = str(ctx.lp).removeprefix("torch.")
    want = dict(y=lp, dx=lp, dgates="float32", dw13=lp, dw2=lp)
    return [_result(f"MoE layer fwd+bwd (triton {lp} vs fp32 reference)", ok and dtypes == want,
                    f"T={T} D={D} F={F} E={E} K={K}, 2 empty experts; rel err {detail}", err, tol)]


def check_determinism(ctx, s) -> list[dict]:
    from kernels.moe import moe_experts  # noqa: PLC0415

    T, D, F, E, K = s["det_T"], s["D"], s["F"], s["E"], s["K"]
    x, ids, gates, w13, w2, dy = _layer_inputs(T, D, F, E, K, ctx.device, 5, ctx.lp)
    fn = lambda *a: moe_experts(*a, backend="triton")
    a = _fwd_bwd(x, ids, gates, w13, w2, dy, fn)
    b = _fwd_bwd(x, ids, gates, w13, w2, dy, fn)
    same = [n for n, u, v in zip(NAMES, a, b) if torch.equal(u, v)]
    return [_result("MoE layer fwd+bwd bitwise deterministic (2 runs)", len(same) == len(NAMES),
                    f"T={T} D={D} F={F} E={E} K={K}: bit-identical {', '.join(same) or 'none'}")]


def check_int64(ctx, s) -> list[dict]:
    """A layer with T x D > 2^31 elements (and S x D = K T x D for the sorted rows): the rows past 2^31 must
    be right. The reference runs on sampled tokens only (each token's y and dx depend on that token alone):
    the first tokens and the last ones, routed to the last experts so their sorted rows sit at the very end."""
    from kernels.moe import moe_experts, moe_experts_reference  # noqa: PLC0415

    b = s["big"]
    T, D, F, E, K = b["T"], b["D"], b["F"], b["E"], b["K"]
    name = "MoE layer fwd+bwd with T x d_model > 2^31 (int64 offsets)"
    big = T * D > 2 ** 31
    if ctx.device.type == "cuda":
        need = T * D * 2 * (4 + 5 * K)  # x, dy, out, dx + K-fold sorted y / dy / dx copies, bf16
        free = torch.cuda.mem_get_info()[0]
        if need > 0.9 * free:
            ctx.skipped.append(("checks", name, f"needs ~{need / 2 ** 30:.0f} GiB, {free / 2 ** 30:.0f} GiB free"))
            return [_result(name, False, f"not run: needs ~{need / 2 ** 30:.0f} GiB, {free / 2 ** 30:.0f} GiB free")]
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(6)
    x = torch.randn(T, D, device=dev, dtype=ctx.lp, generator=g)
    dy = torch.randn(T, D, device=dev, dtype=ctx.lp, generator=g)
    gc = torch.Generator().manual_seed(6)
    ids = _topk_ids(T, E, K, gc, dev)
    n_s = 8 if ctx.dry else 64
    ids[T - n_s:] = torch.arange(E - 1, E - 1 - K, -1, device=dev)  # last tokens -> last experts (end of S)
    gates = torch.rand(T, K, generator=gc).softmax(-1).to(dev)
    w13 = (torch.randn(E, 2 * F, D, generator=gc) * D ** -0.5).to(dev, ctx.lp)
    w2 = (torch.randn(E, D, F, generator=gc) * F ** -0.5).to(dev, ctx.lp)
    xl = x.requires_grad_(True)
    y = moe_experts(xl, ids, gates, w13, w2, backend="triton")
    y.backward(dy)
    sel = torch.cat([torch.arange(n_s), torch.arange(T - n_s, T)]).to(dev)
    got = [y.detach()[sel], xl.grad[sel]]
    del y
    x_s, dy_s = x.detach()[sel], dy[sel]
    ref = _fwd_bwd(x_s.float(), ids[sel], gates[sel], w13.float(), w2.float(), dy_s.float(), moe_experts_reference)
    refbf = _fwd_bwd(x_s, ids[sel], gates[sel], w13, w2, dy_s, moe_experts_reference)
    within, err, tol, detail = _layer_bound(got, ref[:2], refbf[:2], NAMES[:2])
    finite = bool(torch.isfinite(xl.grad).all())
    del xl, x, dy
    ok = within and finite and (big or ctx.dry)
    scale = "" if big else " (dry run: below 2^31, exercises the code path only)"
    return [_result(name, ok, f"T={T} D={D} F={F} E={E} K={K}: T x D = {T * D:.3e}, sorted rows x D = "
                    f"{T * K * D:.3e}{scale}; {2 * n_s} sampled tokens, rel err {detail}; dx finite {finite}",
                    err, tol)]


def run_all(ctx) -> list[dict]:
    s = _sizes(ctx.dry)
    out = []
    for fn in (check_routing, check_router, check_grouped_gemm, check_layer, check_determinism, check_int64):
        try:
            rows = fn(ctx, s)
        except Exception as e:  # noqa: BLE001  (a crashing kernel is a failed check, reported; the rest still run)
            rows = [_result(fn.__name__.removeprefix("check_"), False, f"raised {type(e).__name__}: {str(e)[:300]}")]
        for r in rows:
            ctx.log(f"check {'PASS' if r['passed'] else 'FAIL'}: {r['name']} - {r['detail']}")
        out += rows
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
