"""Fused router kernel: fp32 score (softmax | sigmoid) + selection bias + top-k + optional renormalisation.

One program handles BT token rows with all E experts in registers (E_PAD lanes). Top-k is K rounds of "largest
selection score among the still-free real experts, ties -> lowest id", the winner then taken out of the free
set. The selection bias only changes which experts win; gates are read from the unbiased scores. Outputs match
kernels.router.route_reference: (ids_TK int64, gates_TK fp32, scores_TE fp32), including its rule for NaN/inf
rows (see kernels/router.py): NaN selection scores rank like -inf, ids are always k distinct ids in [0, E),
and NaN scores propagate into the gates. The free set is an explicit mask rather than "-inf the winner and
argmax again" because in a row of -inf (all-NaN logits) the winner would tie with itself, and because a GPU
argmax compares with `>`, so a NaN could pick a padded column >= E.

Backward (autograd) is closed-form elementwise algebra in PyTorch over (T, E) — see _RouteTriton.backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_util import Launch, cdiv, interpreting, next_pow2


@triton.jit
def _router_fwd_kernel(logits_ptr, bias_ptr, ids_ptr, gates_ptr, scores_ptr, T, E, stride_l,
                       K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr, SIGMOID: tl.constexpr,
                       NORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    ex = tl.arange(0, E_PAD)
    tmask = toks < T
    emask = ex < E
    m2 = tmask[:, None] & emask[None, :]
    x = tl.load(logits_ptr + toks.to(tl.int64)[:, None] * stride_l + ex[None, :], mask=m2,
                other=-float("inf")).to(tl.float32)
    x = tl.where(tmask[:, None], x, 0.0)  # rows past T: finite values, never stored (avoids inf - inf)
    if SIGMOID:
        s = tl.where(emask[None, :], 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        xm = tl.max(x, axis=1)
        p = tl.exp(x - xm[:, None])
        p = tl.where(emask[None, :], p, 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    tl.store(scores_ptr + toks.to(tl.int64)[:, None] * E + ex[None, :], s, mask=m2)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + ex, mask=emask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(sel == sel, sel, -float("inf"))  # NaN ranks like -inf (x == x is false only for NaN)
    # K rounds of "max over the free real experts, lowest id among the ties"; the gates are collected in a
    # (BT, K_PAD) tile so they can be renormalised at the end
    kcols = tl.arange(0, K_PAD)
    g_TK = tl.zeros((BT, K_PAD), dtype=tl.float32)
    i_TK = tl.zeros((BT, K_PAD), dtype=tl.int32)
    free = (ex[None, :] + tl.zeros((BT, E_PAD), dtype=tl.int32)) < E  # padded columns are never free
    for kk in tl.static_range(K):
        best = tl.max(tl.where(free, sel, -float("inf")), axis=1)
        # K <= E, so some real expert is still free and idx < E; with best = -inf every free one ties
        idx = tl.min(tl.where(free & (sel == best[:, None]), ex[None, :], E_PAD), axis=1)
        hit = ex[None, :] == idx[:, None]
        g = tl.sum(tl.where(hit, s, 0.0), axis=1)
        g_TK = tl.where(kcols[None, :] == kk, g[:, None], g_TK)
        i_TK = tl.where(kcols[None, :] == kk, idx[:, None], i_TK)
        free = free & (ex[None, :] != idx[:, None])
    if NORM:
        # clamp with a compare, not tl.maximum: that may return 1e-20 for a NaN sum on a GPU (max.f32 drops NaN),
        # while torch's clamp_min keeps the NaN
        z = tl.sum(g_TK, axis=1)
        g_TK = g_TK / tl.where(z < 1e-20, 1e-20, z)[:, None]
    out = toks[:, None] * K + kcols[None, :]
    omask = tmask[:, None] & (kcols[None, :] < K)
    tl.store(ids_ptr + out, i_TK.to(tl.int64), mask=omask)
    tl.store(gates_ptr + out, g_TK, mask=omask)


def _block_t(E_PAD: int) -> int:
    # keep BT * E_PAD around 4K fp32 values per program
    if interpreting():
        return 16
    return max(1, min(4, 256 // E_PAD))


def plan_route(logits_TE: torch.Tensor, top_k: int, score: str = "softmax", norm_topk: bool = True,
               bias_E: torch.Tensor | None = None):
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"router score must be softmax|sigmoid, got {score!r}")
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be 2-D (T, E), got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, n_experts={E}]")
    logits_TE = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
    dev = logits_TE.device
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    gates = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    scores = torch.empty(T, E, dtype=torch.float32, device=dev)
    E_PAD = max(16, next_pow2(E))
    BT = _block_t(E_PAD)
    has_bias = bias_E is not None
    bias = bias_E.float().contiguous() if has_bias else scores
    launch = Launch(_router_fwd_kernel, (max(1, cdiv(T, BT)),),
                    (logits_TE, bias, ids, gates, scores, T, E, logits_TE.stride(0)),
                    dict(K=top_k, K_PAD=next_pow2(top_k), E_PAD=E_PAD, BT=BT, SIGMOID=score == "sigmoid", NORM=bool(norm_topk),
                         HAS_BIAS=has_bias), num_warps=4)
    return (ids, gates, scores), launch


class _RouteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score, norm_topk):
        (ids, gates, scores), launch = plan_route(logits_TE, top_k, score, norm_topk, bias_E)
        if ids.numel() > 0:
            launch.run()
        ctx.save_for_backward(ids, gates, scores)
        ctx.score, ctx.norm = score, norm_topk
        ctx.mark_non_differentiable(ids)
        ctx.logits_dtype = logits_TE.dtype
        return ids, gates, scores

    @staticmethod
    def backward(ctx, _dids, dgates_TK, dscores_TE):
        ids, gates, s = ctx.saved_tensors
        dsc = torch.zeros_like(s) if dscores_TE is None else dscores_TE.float().clone()
        if dgates_TK is not None:
            dg = dgates_TK.float()
            if ctx.norm:  # g_k = sel_k / Z  ->  dsel_k = (dg_k - sum_j dg_j g_j) / Z
                Z = torch.gather(s, 1, ids).sum(-1, keepdim=True).clamp_min(1e-20)
                dg = (dg - (dg * gates).sum(-1, keepdim=True)) / Z
            dsc.scatter_add_(1, ids, dg)
        if ctx.score == "softmax":
            dlogits = s * (dsc - (dsc * s).sum(-1, keepdim=True))
        else:
            dlogits = dsc * s * (1.0 - s)
        return dlogits.to(ctx.logits_dtype), None, None, None, None


def route_triton(logits_TE: torch.Tensor, top_k: int, score: str = "softmax", norm_topk: bool = True,
                 bias_E: torch.Tensor | None = None):
    """Returns (ids_TK int64, gates_TK fp32, scores_TE fp32), differentiable w.r.t. logits_TE."""
    return _RouteTriton.apply(logits_TE, bias_E, top_k, score, norm_topk)
