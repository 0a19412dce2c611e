"""Permute / unpermute: gather token rows into expert order, the router-gate row scaling, and the
deterministic combine back to tokens.

  permute   x_SD[s] = x_TD[perm[s] // K]                       (the K copies of a token land in their experts)
  scale     h_SF[s] = gates_flat[perm[s]] * h_SF[s]            (the gates, on the narrow F side of each expert)
  combine   y_TD[t] = sum_{k=0..K-1} y_SD[inv[t*K + k]]        (fp32, slots summed in order k = 0..K-1)

moe_experts_triton applies the router gates to the down projection's F-wide input rows (W2 (g h) = g (W2 h),
as the reference does): with fine-grained experts F << D (160 vs 1280 at S), so the gate multiply, its
backward and the gate gradient all run over (S, F) instead of (S, D), and the combine is an unweighted sum.
The combine is a gather-reduce, never a scatter-add: each output row is owned by one program and its K slots are
added in a fixed order, so results are bitwise reproducible (no float atomics). Backward:
  permute:  dx_TD = combine(dx_SD)                       (same deterministic gather-reduce)
  combine:  dy_SD[s] = dy_TD[perm[s] // K]               (a gather: unique destinations)
  scale:    dh_SF[s] = gates_flat[perm[s]] * dout_SF[s], dgates_flat[perm[s]] = <dout_SF[s], h_SF[s]>
            (an F-wide dot per sorted row, stored to its own slot: unique destinations)
The weighted combine (gates on the D side; the megablocks adapter's path) is kept with its backward:
  dy_SD[s] = gates_flat[perm[s]] * dy_TD[perm[s] // K],  dgates[t, k] = <dy_TD[t], y_SD[inv[t*K + k]]>.

Tiles: BS / BT = 16 rows per program and BD columns from `pick_block(D, (128, 64, 32))`: 128 for D = 1280 /
1536 / 2048 (16 x 128 bf16 = 4 KiB per program, 256 B contiguous per row for coalescing), and on the F side
32 for F = 160, 64 for 192, 128 for 256 (each an exact tiling; next_pow2 would mask 37% / 25% of the lanes).
The row dot loops over D in BD steps with an fp32 accumulator per row.
"""

from __future__ import annotations

import torch

from kernels._triton_util import Launch, cdiv, interpreting, pick_block

# ----------------------------------------------------------------------------------------------- reference


def permute_reference(x_TD: torch.Tensor, perm_S: torch.Tensor, k: int) -> torch.Tensor:
    return x_TD[perm_S.long() // k]


def combine_reference(y_SD: torch.Tensor, inv_S: torch.Tensor, k: int, gates_TK: torch.Tensor | None = None):
    T = inv_S.numel() // k
    y_TKD = y_SD[inv_S.long()].reshape(T, k, -1).float()
    if gates_TK is not None:
        y_TKD = y_TKD * gates_TK.float().unsqueeze(-1)
    return y_TKD.sum(dim=1).to(y_SD.dtype)


# ----------------------------------------------------------------------------------------------- Triton
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, scale_ptr, out_ptr, S, D, stride_x, stride_o,
                       GATHER: tl.constexpr, DIV: tl.constexpr, HAS_SCALE: tl.constexpr, BS: tl.constexpr,
                       BD: tl.constexpr):
        # out[s] = x[src] * (scale[idx[s]] if HAS_SCALE), src = idx[s] // DIV (GATHER) or s
        rows = tl.program_id(0) * BS + tl.arange(0, BS)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        rmask = rows < S
        m = rmask[:, None] & (cols[None, :] < D)
        slot = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        if GATHER:
            src = slot // DIV
        else:
            src = rows.to(tl.int64)
        v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
            v = (v.to(tl.float32) * sc[:, None])
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _combine_kernel(y_ptr, inv_ptr, gates_ptr, out_ptr, T, D, stride_y, stride_o,
                        K: tl.constexpr, HAS_GATES: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        tmask = toks < T
        m = tmask[:, None] & (cols[None, :] < D)
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for k in range(K):  # fixed slot order -> deterministic sum
            row = tl.load(inv_ptr + toks * K + k, mask=tmask, other=0).to(tl.int64)
            v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_GATES:
                g = tl.load(gates_ptr + toks * K + k, mask=tmask, other=0.0).to(tl.float32)
                v = v * g[:, None]
            acc += v
        tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dgates_kernel(dout_ptr, y_ptr, inv_ptr, dg_ptr, T, D, stride_d, stride_y,
                       K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        tmask = toks < T
        for k in range(K):
            row = tl.load(inv_ptr + toks * K + k, mask=tmask, other=0).to(tl.int64)
            acc = tl.zeros((BT,), dtype=tl.float32)
            for d0 in range(0, D, BD):
                cols = d0 + tl.arange(0, BD)
                m = tmask[:, None] & (cols[None, :] < D)
                a = tl.load(dout_ptr + toks.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=m, other=0.0)
                b = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=m, other=0.0)
                acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
            tl.store(dg_ptr + toks * K + k, acc, mask=tmask)


    @triton.jit
    def _rowdot_kernel(a_ptr, b_ptr, idx_ptr, out_ptr, S, D, stride_a, stride_b, BS: tl.constexpr,
                       BD: tl.constexpr):
        # out[idx[s]] = <a[s], b[s]> in fp32 (idx a permutation: every destination written once)
        rows = tl.program_id(0) * BS + tl.arange(0, BS)
        rmask = rows < S
        r64 = rows.to(tl.int64)
        acc = tl.zeros((BS,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = rmask[:, None] & (cols[None, :] < D)
            a = tl.load(a_ptr + r64[:, None] * stride_a + cols[None, :], mask=m, other=0.0)
            b = tl.load(b_ptr + r64[:, None] * stride_b + cols[None, :], mask=m, other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
        dst = tl.load(idx_ptr + rows, mask=rmask, other=0)
        tl.store(out_ptr + dst, acc, mask=rmask)


def _tiles(D: int):
    """(rows, columns) per program; the module docstring gives the numbers."""
    if interpreting():
        return 16, 32
    return 16, pick_block(D, (128, 64, 32))


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def plan_gather(x_TD, idx_S, div: int, scale=None, out=None, gather: bool = True) -> tuple[torch.Tensor, Launch]:
    """out[s] = x[idx[s] // div] (gather) or x[s] (not gather), times scale_flat[idx[s]] when scale is given."""
    x_TD = _rowmajor(x_TD)
    S, D = idx_S.numel(), x_TD.shape[1]
    if not gather and x_TD.shape[0] != S:
        raise ValueError(f"row scaling: x has {x_TD.shape[0]} rows, idx has {S}")
    out = torch.empty(S, D, dtype=x_TD.dtype, device=x_TD.device) if out is None else out
    BS, BD = _tiles(D)
    has_scale = scale is not None
    sc = scale.reshape(-1).contiguous() if has_scale else idx_S  # unused pointer when no scale
    what = ("gather" if gather else "rows") + (" x gate" if has_scale else "")
    return out, Launch(_gather_kernel, (max(1, cdiv(S, BS)), cdiv(D, BD)),
                       (x_TD, idx_S, sc, out, S, D, x_TD.stride(0), out.stride(0)),
                       dict(GATHER=gather, DIV=div, HAS_SCALE=has_scale, BS=BS, BD=BD), num_warps=4,
                       label=f"{what} D={D}")


def plan_combine(y_SD, inv_S, k: int, gates_TK=None) -> tuple[torch.Tensor, Launch]:
    y_SD = _rowmajor(y_SD)
    T, D = inv_S.numel() // k, y_SD.shape[1]
    out = torch.empty(T, D, dtype=y_SD.dtype, device=y_SD.device)
    BT, BD = _tiles(D)
    has_g = gates_TK is not None
    g = gates_TK.reshape(-1).contiguous() if has_g else inv_S
    return out, Launch(_combine_kernel, (max(1, cdiv(T, BT)), cdiv(D, BD)),
                       (y_SD, inv_S, g, out, T, D, y_SD.stride(0), out.stride(0)),
                       dict(K=k, HAS_GATES=has_g, BT=BT, BD=BD), num_warps=4,
                       label=f"combine{' weighted' if has_g else ''} D={D}")


def plan_dgates(dout_TD, y_SD, inv_S, k: int) -> tuple[torch.Tensor, Launch]:
    dout_TD, y_SD = _rowmajor(dout_TD), _rowmajor(y_SD)
    T, D = inv_S.numel() // k, y_SD.shape[1]
    dg = torch.empty(T, k, dtype=torch.float32, device=y_SD.device)
    BT = 16
    BD = 32 if interpreting() else 64
    return dg, Launch(_dgates_kernel, (max(1, cdiv(T, BT)),),
                      (dout_TD, y_SD, inv_S, dg, T, D, dout_TD.stride(0), y_SD.stride(0)),
                      dict(K=k, BT=BT, BD=BD), num_warps=4, label=f"dgates (D side) D={D}")


def plan_rowdot(a_SD, b_SD, idx_S) -> tuple[torch.Tensor, Launch]:
    """out_flat[idx[s]] = <a[s], b[s]> (fp32, out shaped like idx)."""
    a_SD, b_SD = _rowmajor(a_SD), _rowmajor(b_SD)
    S, D = idx_S.numel(), a_SD.shape[1]
    out = torch.empty(S, dtype=torch.float32, device=a_SD.device)
    BS, BD = _tiles(D)
    return out, Launch(_rowdot_kernel, (max(1, cdiv(S, BS)),),
                       (a_SD, b_SD, idx_S, out, S, D, a_SD.stride(0), b_SD.stride(0)), dict(BS=BS, BD=BD),
                       num_warps=4, label=f"dgates (F side) D={D}")


def _run(out, launch: Launch):
    if out.numel() > 0:
        launch.run()
    return out


def gather_rows_triton(x_TD, idx_S, div: int, scale=None):
    return _run(*plan_gather(x_TD, idx_S, div, scale))


def combine_triton(y_SD, inv_S, k: int, gates_TK=None):
    return _run(*plan_combine(y_SD, inv_S, k, gates_TK))


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_SF, gates_TK, perm_S):
        ctx.save_for_backward(h_SF, gates_TK, perm_S)
        return _run(*plan_gather(h_SF, perm_S, 1, scale=gates_TK, gather=False))

    @staticmethod
    def backward(ctx, dout_SF):
        h_SF, gates_TK, perm_S = ctx.saved_tensors
        dh = dg = None
        if ctx.needs_input_grad[0]:
            dh = _run(*plan_gather(dout_SF, perm_S, 1, scale=gates_TK, gather=False))
        if ctx.needs_input_grad[1]:
            dg = _run(*plan_rowdot(dout_SF, h_SF, perm_S)).view(gates_TK.shape).to(gates_TK.dtype)
        return dh, dg, None


class _CombineSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD, perm_S, inv_S, k):
        ctx.save_for_backward(perm_S)
        ctx.k = k
        return combine_triton(y_SD, inv_S, k)

    @staticmethod
    def backward(ctx, dout_TD):
        (perm_S,) = ctx.saved_tensors
        return gather_rows_triton(dout_TD, perm_S, ctx.k), None, None, None


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, perm_S, inv_S, k):
        ctx.save_for_backward(inv_S)
        ctx.k = k
        return gather_rows_triton(x_TD, perm_S, k)

    @staticmethod
    def backward(ctx, dx_SD):
        (inv_S,) = ctx.saved_tensors
        return combine_triton(dx_SD, inv_S, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SD, gates_TK, perm_S, inv_S, k):
        ctx.save_for_backward(y_SD, gates_TK, perm_S, inv_S)
        ctx.k = k
        return combine_triton(y_SD, inv_S, k, gates_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        y_SD, gates_TK, perm_S, inv_S = ctx.saved_tensors
        k = ctx.k
        dy = dg = None
        if ctx.needs_input_grad[0]:
            dy = gather_rows_triton(dout_TD, perm_S, k, scale=gates_TK)
        if ctx.needs_input_grad[1]:
            dg = _run(*plan_dgates(dout_TD, y_SD, inv_S, k)).to(gates_TK.dtype)
        return dy, dg, None, None, None


def permute_triton(x_TD, perm_S, inv_S, k: int) -> torch.Tensor:
    """x_SD = x_TD[perm // k] with a deterministic backward (autograd)."""
    return _Permute.apply(x_TD, perm_S, inv_S, k)


def scale_rows_triton(h_SF, gates_TK, perm_S) -> torch.Tensor:
    """h_SF[s] * gates_flat[perm_S[s]] for sorted rows (gates any float dtype, multiplied in fp32, rounded
    once to h's dtype); autograd w.r.t. h_SF and gates_TK (dgates in gates_TK's dtype, reduced in fp32)."""
    if gates_TK.numel() != perm_S.numel():
        raise ValueError(f"scale_rows_triton: {gates_TK.numel()} gates for {perm_S.numel()} rows")
    return _ScaleRows.apply(h_SF, gates_TK, perm_S)


def combine_sum_triton(y_SD, perm_S, inv_S, k: int) -> torch.Tensor:
    """y_TD[t] = sum_k y_SD[inv[t*k + j]], j = 0..k-1 in order (autograd w.r.t. y_SD)."""
    return _CombineSum.apply(y_SD, perm_S, inv_S, k)


def combine_weighted_triton(y_SD, gates_TK, perm_S, inv_S, k: int) -> torch.Tensor:
    """y_TD = sum_k gates[t,k] * y_SD[inv[t*k]] (autograd w.r.t. y_SD and gates_TK)."""
    return _Combine.apply(y_SD, gates_TK, perm_S, inv_S, k)
