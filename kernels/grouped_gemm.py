"""Grouped GEMM over expert segments (forward + backward), ScatterMoE-style gather in the kernel.

Rows are in expert order (see kernels/routing.py): expert e owns rows [offsets[e], offsets[e+1]).
Weights use the model's layout W (E, N, Kd) and every product is "rows times W_e transposed":

  forward   Y[s, :] = X[src(s), :] @ W_e^T        (S, N)     src(s) = perm[s] // DIV when gathering, else s
  backward  dX_S    = dY_S @ W_e                  (S, Kd)    same kernel, W read with swapped strides
            dW_e    = dY_e^T @ X[src(e rows)]     (E, N, Kd) one program per (expert, N tile, Kd tile)

With a gather (the first projection reads the token matrix directly, no padded / permuted copy of x) the
backward dX is reduced from sorted rows back to tokens by the deterministic combine in kernels/permute.py.

Tile scheduling: a program's M tile never straddles two experts. There are cdiv(S, BM) + E M-slots (an
upper bound on sum_e cdiv(n_e, BM)); each program finds its expert from the per-expert tile prefix sum held
in registers (E_PAD lanes), so there is no host sync and no per-expert launch; slots past the end exit.
Experts with zero rows get no M tiles (forward) and a zero dW (backward). fp32 accumulation always; bf16 /
fp16 operands go to tl.dot directly (wgmma on sm_90), fp32 operands use IEEE precision. The interpreter's
bf16 tl.dot is wrong, so under it UPCAST converts bf16 tiles to fp32 before the dot.

Launch order (L2 reuse). Both kernels use a 1-D grid. The row GEMM maps program ids to (M slot, N tile) in
GROUP_M-tall bands (the Triton-tutorial swizzle): the GROUP_M x cdiv(N, BN) programs of a band run together,
each X row tile is read by every N tile of the band and each W_e column tile by GROUP_M M tiles, while the
band's working set stays small (GROUP_M=8, BM=64: 512 rows x D=2048 x 2 B = 2 MiB of X plus one expert's
W_e, 2F x D x 2 B <= 2 MiB at L), well inside A100's 40 MiB / H100's 50 MiB L2. dW numbers its programs
expert-major, so all tiles of one expert (which all read the same dY_e and X_e rows) are adjacent.

Tile tables (`config_for`, the one function both the launch path and kernels/aot.py use). The real shapes
(model.config S / M / L: D = 1280 / 1536 / 2048, F = 160 / 192 / 256) give these GEMMs per layer:
  up   fwd  N = 2F (320 / 384 / 512),  Kd = D          down fwd  N = D,  Kd = F
  up   dX   N = D,  Kd = 2F                             down dX   N = F,  Kd = D
  dW up     (2F x D) tiles, reduce over rows            dW down   (D x F) tiles, reduce over rows
BN / BK are chosen by `pick_block`: the largest power of two (<= 128) that pads the extent by at most 12.5%.
So N = 160 -> BN 32 (5 exact tiles; 64 would pad to 192, 128 to 256 = 37% masked columns), N = 192 -> 64
(3 exact; 128 would waste 25%), N = 320 -> 64 (5 exact; 128 pads to 384), 384 / 512 / D -> 128.
BK: Kd = 160 -> 32 (5 steps, exact), 192 -> 64 (3 steps), 256 / 320 / 384 / 512 / D -> 64 (4..32 steps).
num_stages = min(steps, 4 on sm_90 / 3 on sm_80) and >= 2: with Kd = 192 (3 steps of 64) three stages put
every K tile of the program in flight at once; more stages than steps would only cost shared memory.
BM = 64 rows: a segment has T*K/E rows (~1.4-1.5K at 16K tokens per micro-batch for S / M / L), so the ragged
last tile of each expert wastes 32 rows on average (~2%), and 64 is wgmma's M per warpgroup: 4 warps = one
warpgroup on sm_90. Shared memory per stage = (BM*BK + BK*BN) * 2 B <= 24 KiB, 96 KiB at 4 stages.
dW: BN over N and BK over Kd from (128, 64, 32), the reduction over rows in BM = 64 steps (~24 per expert);
8 warps when the fp32 accumulator is 128 x 128 (64 registers per thread), else 4; stages as above (3 / 4),
(BN*BM + BM*BK) * 2 B <= 32 KiB per stage.
The interpreter (cc 0) uses tiny tiles (BM 16, BN 32, BK 32, GROUP_M 2, 1 stage) so short test segments
span several M tiles, N / K span several tiles and the band swizzle is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton_util import Launch, cdiv, interpreting, next_pow2, pick_block, plans_for_gpu, target_cc
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
    def _gg_fwd_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, perm_ptr, N, KD, E, M_SLOTS,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       GATHER: tl.constexpr, DIV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr, UPCAST: tl.constexpr,
                       PREC: tl.constexpr):
        # Y[s, n] = sum_k X[src(s), k] * B_e[k, n], B_e[k, n] at w + e*stride_we + k*stride_wk + n*stride_wn
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BN)
        band = GROUP_M * n_tiles  # programs per GROUP_M-tall band of M slots
        first_m = (pid // band) * GROUP_M
        band_m = tl.minimum(M_SLOTS - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % band_m
        pid_n = (pid % band) // band_m
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
        # dW[e, n, k] = sum_{s in rows of e} dY[s, n] * X[src(s), k]; program ids expert-major so one expert's
        # (N tile, Kd tile) programs are adjacent and share its dY_e / X_e rows in L2
        pid = tl.program_id(0)
        n_tiles_k = tl.cdiv(KD, BK)
        per_e = tl.cdiv(N, BN) * n_tiles_k
        e = pid // per_e
        t = pid % per_e
        cols_n = (t // n_tiles_k) * BN + tl.arange(0, BN)
        cols_k = (t % n_tiles_k) * BK + tl.arange(0, BK)
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


@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    GROUP_M: int
    num_warps: int
    num_stages: int


def config_for(op: str, N: int, KD: int, cc: int) -> GemmConfig:
    """Tiles for one grouped GEMM (the module docstring explains every number).

    op "rows": Y (rows, N) = X (rows, KD) @ B_e, the forward and the dX pass; BN tiles N, BK tiles the
    reduction KD. op "dw": dW_e (N, KD), BN x BK output tiles, reduced over the expert's rows in BM steps.
    cc 0 is the CPU interpreter."""
    if op not in ("rows", "dw"):
        raise ValueError(f"config_for: op must be rows|dw, got {op!r}")
    if cc == 0:
        return GemmConfig(16, 32, 32, 2, 4, 1)
    max_stages = 4 if cc >= 90 else 3
    BN = pick_block(N, (128, 64, 32))
    if op == "rows":
        BK = pick_block(KD, (64, 32))
        return GemmConfig(64, BN, BK, 8, 4, max(2, min(max_stages, cdiv(KD, BK))))
    BK = pick_block(KD, (128, 64, 32))
    return GemmConfig(64, BN, BK, 1, 8 if BN * BK >= 128 * 128 else 4, max_stages)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # precision only applies to fp32 operands


def plan_gg_fwd(x, w_ENK, offsets_E1, perm_S=None, k: int = 1, transpose_w: bool = True, cc: int | None = None,
                config: GemmConfig | None = None):
    """Y = X[src] @ W_e^T (transpose_w) or X[src] @ W_e (dX in the backward). Returns (Y, Launch)."""
    E, WN, WK = w_ENK.shape
    N, KD = (WN, WK) if transpose_w else (WK, WN)
    if x.shape[1] != KD:
        raise ValueError(f"grouped GEMM: x has {x.shape[1]} columns, expected {KD} (W {tuple(w_ENK.shape)})")
    S = x.shape[0] if perm_S is None else perm_S.numel()
    cc = target_cc(x.device) if cc is None else cc
    c = config or config_for("rows", N, KD, 0 if interpreting() else cc)
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if transpose_w:  # B_e[k, n] = W[e, n, k]
        s_wk, s_wn = w_ENK.stride(2), w_ENK.stride(1)
    else:            # B_e[k, n] = W[e, k, n]
        s_wk, s_wn = w_ENK.stride(1), w_ENK.stride(2)
    gather = perm_S is not None
    if plans_for_gpu(x.device):
        m_slots = cdiv(S, c.BM) + E  # upper bound, no host sync; surplus programs exit at once
    else:  # CPU (the interpreter): a sync is free and every program launched costs ~ms, so size it exactly
        counts = (offsets_E1[1:] - offsets_E1[:-1]).long()
        m_slots = int(((counts + c.BM - 1) // c.BM).sum())
    m_slots = max(1, m_slots)
    launch = Launch(_gg_fwd_kernel, (m_slots * cdiv(N, c.BN),),
                    (x, w_ENK, y, offsets_E1, perm_S if gather else offsets_E1, N, KD, E, m_slots,
                     x.stride(0), x.stride(1), w_ENK.stride(0), s_wk, s_wn, y.stride(0), y.stride(1)),
                    dict(GATHER=gather, DIV=k, BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M,
                         E_PAD=max(16, next_pow2(E)), UPCAST=interpreting() and x.dtype == torch.bfloat16,
                         PREC=_prec(x.dtype)),
                    num_warps=c.num_warps, num_stages=c.num_stages,
                    label=f"gemm {'fwd' if transpose_w else 'dX'}{' gather' if gather else ''} N={N} Kd={KD}")
    return y, launch


def plan_gg_dw(x, dy_SN, offsets_E1, w_shape, perm_S=None, k: int = 1, cc: int | None = None,
               config: GemmConfig | None = None):
    """dW (E, N, Kd) = per expert dY_e^T @ X[src(e rows)]. Returns (dW fp32-accumulated in x.dtype, Launch)."""
    E, N, KD = w_shape
    cc = target_cc(x.device) if cc is None else cc
    c = config or config_for("dw", N, KD, 0 if interpreting() else cc)
    dw = torch.empty(E, N, KD, dtype=x.dtype, device=x.device)
    gather = perm_S is not None
    launch = Launch(_gg_dw_kernel, (E * cdiv(N, c.BN) * cdiv(KD, c.BK),),
                    (x, dy_SN, dw, offsets_E1, perm_S if gather else offsets_E1, N, KD,
                     x.stride(0), x.stride(1), dy_SN.stride(0), dy_SN.stride(1), dw.stride(0), dw.stride(1), dw.stride(2)),
                    dict(GATHER=gather, DIV=k, BM=c.BM, BN=c.BN, BK=c.BK,
                         UPCAST=interpreting() and x.dtype == torch.bfloat16, PREC=_prec(x.dtype)),
                    num_warps=c.num_warps, num_stages=c.num_stages,
                    label=f"gemm dW{' gather' if gather else ''} N={N} Kd={KD}")
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
