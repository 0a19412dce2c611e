"""The CPU training path of the routed experts: one autograd.Function, forward and backward written by hand.

Same maths, same row order and the same per-expert torch.mm calls as kernels.moe.moe_experts_reference
(method "slices"), which stays the reference this path is tested against (tests/test_moe_cpu_path.py). What
it removes is work around the GEMMs:
  * one autograd node instead of ~12 (three _RowGathers, two _SlicedGemms, chunk/silu/mul/gate graph):
    backward runs no generic broadcast-reduction for the gate gradient and no per-node Python dispatch;
  * silu's backward, the SwiGLU product rule and the gate scaling are fused into one pass that writes the
    (S, 2F) gate|up gradient in place, so no torch.cat of two halves and no separate silu_backward buffer;
  * the gate and up projections stay one matmul per expert (w_gate_up is (E, 2F, D)), as in the reference.
  * with balanced routing (layout "padded", chosen by "auto" while padding adds <= 25 % rows) each pass is one
    torch.bmm over an (E, C) grid instead of E torch.mm calls.
Rows are sorted by expert once; each expert multiplies a contiguous slice; results go back to slot order by
a gather with the inverse permutation and a fixed-order sum over the k slots (no index_add, deterministic).

Selected by backend "cpu" (kernels.moe.resolve_backend logs the choice once); "auto" on CPU stays on the
reference because this path measured no faster end to end (bench/results/kernels.md, "CPU training path"):
at these shapes the per-expert GEMMs themselves are the cost, and fusing the work around them or batching
them into one bmm moved a layer's forward + backward by 0.88-1.13x and a training step by 1.00-1.03x, within
the noise of the shared machine it was measured on.
act_fq (the QAT activation fake-quant of the down projection's input) is supported: its backward is taken
through autograd on the saved pre-quant rows, so any differentiable fake-quant works unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("mobilemoe.kernels")


def _expert_mm(a_SK: torch.Tensor, w_ENK: torch.Tensor, bounds: list[int], out_SN: torch.Tensor) -> None:
    """out[rows of e] = a[rows of e] @ w[e]^T for every non-empty expert e (rows of e: bounds[e-1]:bounds[e])."""
    lo = 0
    for e, hi in enumerate(bounds):
        if hi > lo:
            torch.mm(a_SK[lo:hi], w_ENK[e].t(), out=out_SN[lo:hi])
        lo = hi


def _expert_mm_nt(a_SK: torch.Tensor, w_EKN: torch.Tensor, bounds: list[int], out_SN: torch.Tensor) -> None:
    """out[rows of e] = a[rows of e] @ w[e] (the input gradient of _expert_mm)."""
    lo = 0
    for e, hi in enumerate(bounds):
        if hi > lo:
            torch.mm(a_SK[lo:hi], w_EKN[e], out=out_SN[lo:hi])
        lo = hi


def _expert_dw(dy_SN: torch.Tensor, a_SK: torch.Tensor, bounds: list[int], out_ENK: torch.Tensor) -> None:
    """out[e] = dy[rows of e]^T @ a[rows of e]; an expert with no rows gets an exact zero gradient."""
    lo = 0
    for e, hi in enumerate(bounds):
        if hi > lo:
            torch.mm(dy_SN[lo:hi].t(), a_SK[lo:hi], out=out_ENK[e])
        else:
            out_ENK[e].zero_()
        lo = hi


def _scale_rows(h_SF: torch.Tensor, g_S: torch.Tensor) -> torch.Tensor:
    """h * g per row; with half-precision rows the product is formed in fp32 and rounded once (as the
    reference and the Triton path do)."""
    if h_SF.dtype == g_S.dtype:
        return h_SF * g_S.unsqueeze(1)
    return (h_SF.float() * g_S.float().unsqueeze(1)).to(h_SF.dtype)


# "auto" pads to the (E, C) grid while the padding costs at most this fraction of extra rows: timed alone, one
# torch.bmm ran 1.2-1.8x faster than E torch.mm calls at D 32-64 (128 rows per expert, 1 thread), while a
# skewed router (one expert with most of the rows) would multiply the work by up to E.
PAD_MAX_WASTE = 0.25
_logged_layouts: set = set()


def _pick_layout(padded_rows: int, S: int) -> str:
    kind = "padded" if padded_rows <= (1 + PAD_MAX_WASTE) * S else "slices"
    if kind not in _logged_layouts:
        _logged_layouts.add(kind)
        log.info("CPU MoE experts: %s layout (first chosen at E*C/S = %.2f, pads while <= %.2f)",
                 "padded bmm" if kind == "padded" else "per-expert slices", padded_rows / S, 1 + PAD_MAX_WASTE)
    return kind


class _Layout:
    """Where each token-slot's row lives. "slices": the S slots sorted by expert, expert e owning rows
    bounds[e-1]:bounds[e]; "padded": an (E, C) grid, C = the largest expert's row count, expert e owning
    rows e*C .. e*C + counts[e] - 1 and the rest zero rows (a zero input row stays zero through SwiGLU, a zero
    gate and a zero output gradient, so padding adds nothing to any gradient)."""

    def __init__(self, ids_TK: torch.Tensor, E: int, kind: str):
        T, K = ids_TK.shape
        S = T * K
        flat_S = ids_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)  # sorted row -> slot
        counts_E = torch.bincount(flat_S, minlength=E)
        if kind == "auto":
            kind = _pick_layout(int(counts_E.max()) * E, S)
        self.kind, self.T, self.K, self.E = kind, T, K, E
        if kind == "slices":
            self.R = S
            row_of_slot = torch.empty_like(order_S)
            row_of_slot[order_S] = torch.arange(S, device=order_S.device)
            self.slot_of_row = order_S  # every row is a real slot
            self.bounds = torch.cumsum(counts_E, 0).tolist()
        else:
            C = int(counts_E.max())
            self.R, self.C = E * C, C
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            e_S = flat_S.index_select(0, order_S)
            pad_of_sorted = e_S * C + torch.arange(S, device=flat_S.device) - starts_E.index_select(0, e_S)
            row_of_slot = torch.empty_like(order_S)
            row_of_slot[order_S] = pad_of_sorted
            self.slot_of_row = torch.full((self.R,), S, dtype=torch.long, device=flat_S.device)  # S = padding
            self.slot_of_row[pad_of_sorted] = order_S
        self.row_of_slot = row_of_slot
        self.tok_of_row = self.slot_of_row // K  # padding rows read token T: the appended zero row

    def rows(self, v_TX: torch.Tensor, per_slot: bool = False) -> torch.Tensor:
        """The value of each row's token (per_slot: of its slot) from a (T, X) / (T*K, X) tensor; zero rows
        for padding."""
        idx = self.slot_of_row if per_slot else self.tok_of_row
        if self.kind == "padded":
            v_TX = torch.cat([v_TX, v_TX.new_zeros(1, v_TX.shape[1])], 0)
        return v_TX.index_select(0, idx)

    def to_tokens(self, v_RX: torch.Tensor) -> torch.Tensor:
        """Back to token order: each token's K slot rows summed in slot order (k = 0..K-1)."""
        return v_RX.index_select(0, self.row_of_slot).view(self.T, self.K, v_RX.shape[1]).sum(1)

    def to_slots(self, v_R: torch.Tensor) -> torch.Tensor:
        return v_R.index_select(0, self.row_of_slot).view(self.T, self.K)

    def mm(self, a_RK, w_ENK, out_RN):
        """out = a @ w[e]^T on each expert's rows."""
        if self.kind == "slices":
            return _expert_mm(a_RK, w_ENK, self.bounds, out_RN)
        E, C = self.E, self.C
        torch.bmm(a_RK.view(E, C, -1), w_ENK.transpose(1, 2), out=out_RN.view(E, C, -1))

    def mm_nt(self, a_RN, w_ENK, out_RK):
        """out = a @ w[e] on each expert's rows (the input gradient of mm)."""
        if self.kind == "slices":
            return _expert_mm_nt(a_RN, w_ENK, self.bounds, out_RK)
        E, C = self.E, self.C
        torch.bmm(a_RN.view(E, C, -1), w_ENK, out=out_RK.view(E, C, -1))

    def dw(self, dy_RN, a_RK, out_ENK):
        """out[e] = dy[rows of e]^T @ a[rows of e] (the weight gradient of mm)."""
        if self.kind == "slices":
            return _expert_dw(dy_RN, a_RK, self.bounds, out_ENK)
        E, C = self.E, self.C
        torch.bmm(dy_RN.view(E, C, -1).transpose(1, 2), a_RK.view(E, C, -1), out=out_ENK)


class _CpuExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gates_TK, w_gate_up_EFD, w_down_EDF, ids_TK, act_fq, layout_kind):
        E, F2, _ = w_gate_up_EFD.shape
        Fh, D_out = F2 // 2, w_down_EDF.shape[1]
        L = _Layout(ids_TK, E, layout_kind)
        xs_RD = L.rows(x_TD)
        gu_R2F = xs_RD.new_empty(L.R, F2)
        L.mm(xs_RD, w_gate_up_EFD, gu_R2F)
        g_RF, u_RF = gu_R2F[:, :Fh], gu_R2F[:, Fh:]
        a_RF = F.silu(g_RF)
        h_RF = a_RF * u_RF
        hq_RF, h_leaf = h_RF, None
        if act_fq is not None:
            h_leaf = h_RF.detach().requires_grad_()
            with torch.enable_grad():
                hq_RF = act_fq(h_leaf)
        gs_R = L.rows(gates_TK.reshape(-1, 1), per_slot=True).view(-1)
        hg_RF = _scale_rows(hq_RF.detach(), gs_R)
        ys_RD = hg_RF.new_empty(L.R, D_out)
        L.mm(hg_RF, w_down_EDF, ys_RD)
        ctx.save_for_backward(xs_RD, gu_R2F, a_RF, hq_RF.detach(), hg_RF, gs_R, w_gate_up_EFD, w_down_EDF)
        ctx.layout, ctx.dx_dtype = L, x_TD.dtype
        ctx.act = (h_leaf, hq_RF) if act_fq is not None else None
        return L.to_tokens(ys_RD)

    @staticmethod
    def backward(ctx, dy_TD):
        xs_RD, gu_R2F, a_RF, hq_RF, hg_RF, gs_R, w13, w2 = ctx.saved_tensors
        L = ctx.layout
        need_x, need_g, need_w13, need_w2 = ctx.needs_input_grad[:4]
        R, F2 = gu_R2F.shape
        Fh = F2 // 2
        dys_RD = L.rows(dy_TD.to(hg_RF.dtype))  # every slot of a token gets its dy
        dw2 = None
        if need_w2:
            dw2 = torch.empty_like(w2)
            L.dw(dys_RD, hg_RF, dw2)
        dhg_RF = hg_RF.new_empty(R, Fh)
        L.mm_nt(dys_RD, w2, dhg_RF)
        dgates = None
        if need_g:  # an F-wide dot per row, reduced in fp32 (model/precision.py)
            dgs_R = (dhg_RF * hq_RF).sum(1) if dhg_RF.dtype == torch.float32 else \
                (dhg_RF.float() * hq_RF.float()).sum(1)
            dgates = L.to_slots(dgs_R).to(gs_R.dtype)
        if not (need_x or need_w13):
            return None, dgates, None, dw2, None, None, None
        dh_RF = _scale_rows(dhg_RF, gs_R)
        if ctx.act is not None:
            h_leaf, hq = ctx.act
            (dh_RF,) = torch.autograd.grad(hq, h_leaf, dh_RF)
        g_RF, u_RF = gu_R2F[:, :Fh], gu_R2F[:, Fh:]
        dgu_R2F = torch.empty_like(gu_R2F)
        torch.mul(dh_RF, a_RF, out=dgu_R2F[:, Fh:])  # d up = dh * silu(g)
        # d gate = (dh * u) * silu'(g): aten's silu_backward, written straight into the gate half
        torch.ops.aten.silu_backward.grad_input(dh_RF * u_RF, g_RF, grad_input=dgu_R2F[:, :Fh])
        dx = dw13 = None
        if need_w13:
            dw13 = torch.empty_like(w13)
            L.dw(dgu_R2F, xs_RD, dw13)
        if need_x:
            dxs_RD = xs_RD.new_empty(xs_RD.shape)
            L.mm_nt(dgu_R2F, w13, dxs_RD)
            dx = L.to_tokens(dxs_RD).to(ctx.dx_dtype)
        return dx, dgates, dw13, dw2, None, None, None


def moe_experts_cpu(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                    w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                    act_fq: Callable | None = None, layout: str = "auto") -> torch.Tensor:
    """Dropless routed SwiGLU experts, CPU training path (same signature and result as moe_experts_reference).

    x_TD (T, D); ids_TK, gates_TK (T, K); w_gate_up_EFD (E, 2F, D) = [gate; up] rows; w_down_EDF (E, D, F)."""
    T, K = ids_TK.shape
    if T * K == 0:  # nothing routed: the reference handles the empty shapes (and gives exact zero gradients)
        from kernels.moe import moe_experts_reference  # noqa: PLC0415  (kernels.moe imports this module)

        return moe_experts_reference(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    return _CpuExperts.apply(x_TD, gates_TK, w_gate_up_EFD, w_down_EDF, ids_TK, act_fq, layout)
