"""Grouped GEMM over expert segments (forward + backward), ScatterMoE-style gather in the kernel.

Rows are in expert order (see kernels/routing.py): expert e owns rows [offsets[e], offsets[e+1]).
Weights use the model's layout W (E, N, Kd) and every product is "rows times W_e transposed":

  forward   Y[s, :] = X[src(s), :] @ W_e^T        (S, N)     src(s) = perm[s] // DIV when gathering, else s
  backward  dX_S    = dY_S @ W_e                  (S, Kd)    same kernel, W read with swapped strides
            dW_e    = dY_e^T @ X[src(e rows)]     (E, N, Kd) one program per (expert, N tile, Kd tile)

With a gather (the first projection reads the token matrix directly, no padded / permuted copy of x) the
backward dX is reduced from sorted rows back to tokens by the deterministic combine in kernels/permute.py.

Tile scheduling: a program's M tile never straddles two experts. The grid has cdiv(S, BM) + E M-slots (an
upper bound on sum_e cdiv(n_e, BM)); each program finds its expert from the per-expert tile prefix sum held
in registers (E_PAD lanes), so there is no host sync and no per-expert launch; slots past the end exit.
Experts with zero rows get no M tiles (forward) and a zero dW (backward). fp32 accumulation always; bf16 /
fp16 operands go to tl.dot directly (wgmma on sm_90), fp32 operands use IEEE precision.
"""

from __future__ import annotations

import torch

from kernels._triton_util import Launch, cdiv, device_cc, interpreting, next_pow2
from kernels.permute import combine_reference, combine_triton

# ----------------------------------------------------------------------------------------------- reference


def grouped_gemm_reference(x, w_ENK, offsets_E1, perm_S=None, k: int = 1):
    """Per-expert slices: Y[rows of e] = X_e @ W_e^T. x is (S, Kd), or (T, Kd) gathered through perm_S // k."""
    xs = x if perm_S is None else x[perm_S.long() // k]
    offs = offsets_E1.tolist()
    y = xs.new_empty(xs.shape[0], w_ENK.shape[1])
    for e in range(w_ENK.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            y[a:b] = xs[a:b] @ w_ENK[e].t()
    return y


# ----------------------------------------------------------------------------------------------- Triton
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _find_tile(offsets_ptr, pid_m, E, BM: tl.constexpr, E_PAD: tl.constexpr):
        """Map an M slot to (expert, first row, end row); expert == E when the slot is past the last tile."""
        ex = tl.arange(0, E_PAD)
        lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
        hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0)
        tiles = (hi - lo + BM - 1) // BM
        cum = tl.cumsum(tiles, axis=0)  # inclusive
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        first_tile = tl.sum(tl.where(ex == e, cum - tiles, 0), axis=0)
        row0 = tl.sum(tl.where(ex == e, lo, 0), axis=0) + (pid_m - first_tile) * BM
        row_end = tl.sum(tl.where(ex == e, hi, 0), axis=0)
        return e, row0, row_end

    @triton.jit
    def _gg_fwd_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, perm_ptr, N, KD, E,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       GATHER: tl.constexpr, DIV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, E_PAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        # Y[s, n] = sum_k X[src(s), k] * B_e[k, n], B_e[k, n] at w + e*stride_we + k*stride_wk + n*stride_wn
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e, row0, row_end = _find_tile(offsets_ptr, pid_m, E, BM, E_PAD)
        if e < E:
            rows = row0 + tl.arange(0, BM)
            rmask = rows < row_end
            if GATHER:
                src = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64) // DIV
            else:
                src = rows.to(tl.int64)
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < N
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, KD, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < KD
                a = tl.load(x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                            mask=kmask[:, None] & cmask[None, :], other=0.0)
                if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32 there
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PREC)
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _gg_dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, perm_ptr, N, KD,
                      stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wn, stride_wk,
                      GATHER: tl.constexpr, DIV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        # dW[e, n, k] = sum_{s in rows of e} dY[s, n] * X[src(s), k]; one program per (e, N tile, Kd tile)
        e = tl.program_id(0)
        pid = tl.program_id(1)
        n_tiles_k = tl.cdiv(KD, BK)
        cols_n = (pid // n_tiles_k) * BN + tl.arange(0, BN)
        cols_k = (pid % n_tiles_k) * BK + tl.arange(0, BK)
        nmask = cols_n < N
        kmask = cols_k < KD
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for r0 in range(start, end, BM):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < end
            if GATHER:
                src = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64) // DIV
            else:
                src = rows.to(tl.int64)
            dyt = tl.load(dy_ptr + cols_n[:, None] * stride_dyn + rows.to(tl.int64)[None, :] * stride_dym,
                          mask=nmask[:, None] & rmask[None, :], other=0.0)  # (BN, BM) = dY_e^T tile
            xt = tl.load(x_ptr + src[:, None] * stride_xm + cols_k[None, :] * stride_xk,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BM, BK)
            if UPCAST:
                dyt = dyt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(dyt, xt, acc, input_precision=PREC)
        tl.store(dw_ptr + e.to(tl.int64) * stride_we + cols_n[:, None] * stride_wn + cols_k[None, :] * stride_wk,
                 acc.to(dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


# Per-architecture tiles (BM, BN, BK, num_warps, num_stages). Fine-grained experts give short segments
# (T*K/E rows), so BM stays at 64; sm_90 uses 4 warps (one warpgroup) so tl.dot lowers to wgmma.
_FWD_TILES = {
    0: (16, 64, 32, 4, 1),      # interpreter: BM 16 so short / ragged segments span several tiles
    80: (64, 128, 64, 4, 3),
    90: (64, 128, 64, 4, 4),
}
_DW_TILES = {
    0: (16, 64, 32, 4, 1),
    80: (64, 128, 64, 8, 3),
    90: (64, 128, 64, 8, 3),
}


def _tiles(table: dict, cc: int):
    if interpreting() or cc == 0:
        return table[0]
    return table[90] if cc >= 90 else table[80]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # precision only applies to fp32 operands


def plan_gg_fwd(x, w_ENK, offsets_E1, perm_S=None, k: int = 1, transpose_w: bool = True, cc: int | None = None,
                tiles=None):
    """Y = X[src] @ W_e^T (transpose_w) or X[src] @ W_e (dX in the backward). Returns (Y, Launch)."""
    E, WN, WK = w_ENK.shape
    N, KD = (WN, WK) if transpose_w else (WK, WN)
    if x.shape[1] != KD:
        raise ValueError(f"grouped GEMM: x has {x.shape[1]} columns, expected {KD} (W {tuple(w_ENK.shape)})")
    S = x.shape[0] if perm_S is None else perm_S.numel()
    cc = device_cc(x.device) if cc is None else cc
    BM, BN, BK, warps, stages = tiles or _tiles(_FWD_TILES, cc)
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if transpose_w:  # B_e[k, n] = W[e, n, k]
        s_wk, s_wn = w_ENK.stride(2), w_ENK.stride(1)
    else:            # B_e[k, n] = W[e, k, n]
        s_wk, s_wn = w_ENK.stride(1), w_ENK.stride(2)
    gather = perm_S is not None
    if x.device.type == "cuda":
        m_slots = cdiv(S, BM) + E  # upper bound, no host sync; surplus programs exit at once
    else:  # CPU (the interpreter): a sync is free and every program launched costs ~ms, so size it exactly
        counts = (offsets_E1[1:] - offsets_E1[:-1]).long()
        m_slots = int(((counts + BM - 1) // BM).sum())
    grid = (max(1, m_slots), cdiv(N, BN))
    upcast = interpreting() and x.dtype == torch.bfloat16
    launch = Launch(_gg_fwd_kernel, grid,
                    (x, w_ENK, y, offsets_E1, perm_S if gather else offsets_E1, N, KD, E,
                     x.stride(0), x.stride(1), w_ENK.stride(0), s_wk, s_wn, y.stride(0), y.stride(1)),
                    dict(GATHER=gather, DIV=k, BM=BM, BN=BN, BK=BK, E_PAD=max(16, next_pow2(E)), UPCAST=upcast,
                         PREC=_prec(x.dtype)),
                    num_warps=warps, num_stages=stages)
    return y, launch


def plan_gg_dw(x, dy_SN, offsets_E1, w_shape, perm_S=None, k: int = 1, cc: int | None = None, tiles=None):
    """dW (E, N, Kd) = per expert dY_e^T @ X[src(e rows)]. Returns (dW fp32-accumulated in x.dtype, Launch)."""
    E, N, KD = w_shape
    cc = device_cc(x.device) if cc is None else cc
    BM, BN, BK, warps, stages = tiles or _tiles(_DW_TILES, cc)
    dw = torch.empty(E, N, KD, dtype=x.dtype, device=x.device)
    gather = perm_S is not None
    upcast = interpreting() and x.dtype == torch.bfloat16
    launch = Launch(_gg_dw_kernel, (E, cdiv(N, BN) * cdiv(KD, BK)),
                    (x, dy_SN, dw, offsets_E1, perm_S if gather else offsets_E1, N, KD,
                     x.stride(0), x.stride(1), dy_SN.stride(0), dy_SN.stride(1), dw.stride(0), dw.stride(1), dw.stride(2)),
                    dict(GATHER=gather, DIV=k, BM=BM, BN=BN, BK=BK, UPCAST=upcast, PREC=_prec(x.dtype)),
                    num_warps=warps, num_stages=stages)
    return dw, launch


def _gg_fwd(x, w, offsets, perm=None, k=1, transpose_w=True):
    y, launch = plan_gg_fwd(x, w, offsets, perm, k, transpose_w)
    if y.numel() > 0:
        launch.run()
    return y


def _gg_dw(x, dy, offsets, w_shape, perm=None, k=1):
    dw, launch = plan_gg_dw(x, dy, offsets, w_shape, perm, k)
    launch.run()  # every expert writes its tile (zeros when it has no rows)
    return dw


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ENK, offsets_E1, perm_S, inv_S, k):
        x = x if x.stride(-1) == 1 else x.contiguous()
        ctx.save_for_backward(x, w_ENK, offsets_E1, perm_S, inv_S)
        ctx.k = k
        return _gg_fwd(x, w_ENK, offsets_E1, perm_S, k, transpose_w=True)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, perm, inv = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gg_fwd(dy, w, offsets, None, 1, transpose_w=False)  # sorted rows (S, Kd)
            if perm is not None:  # gathered input: reduce each token's K rows back, deterministically
                dx = combine_triton(dx, inv, ctx.k)
        if ctx.needs_input_grad[1]:
            dw = _gg_dw(x, dy, offsets, tuple(w.shape), perm, ctx.k)
        return dx, dw, None, None, None, None


def grouped_gemm_triton(x, w_ENK, offsets_E1, perm_S=None, inv_S=None, k: int = 1):
    """Y (S, N) = X_e @ W_e^T per expert segment, autograd w.r.t. x and w_ENK.

    Without perm_S, x is (S, Kd) in expert order. With perm_S (and inv_S for the backward), x is the (T, Kd)
    token matrix and sorted row s reads token perm_S[s] // k inside the kernel.
    """
    if perm_S is not None and inv_S is None:
        raise ValueError("grouped_gemm_triton: a gathered input (perm_S) needs inv_S for its backward")
    return _GroupedGemm.apply(x, w_ENK, offsets_E1, perm_S, inv_S, k)


def grouped_gemm_backward_reference(x, w_ENK, offsets_E1, dy, perm_S=None, inv_S=None, k: int = 1):
    """(dx, dW) twin of the Triton backward, by per-expert slices."""
    xs = x if perm_S is None else x[perm_S.long() // k]
    offs = offsets_E1.tolist()
    dxs = xs.new_zeros(xs.shape)
    dw = torch.zeros_like(w_ENK)
    for e in range(w_ENK.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            dxs[a:b] = dy[a:b] @ w_ENK[e]
            dw[e] = dy[a:b].t() @ xs[a:b]
    dx = dxs if perm_S is None else combine_reference(dxs, inv_S, k)
    return dx, dw
