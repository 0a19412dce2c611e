"""moe_experts_triton: the dropless routed SwiGLU experts built from the Triton kernels, with autograd.

  routing (histogram, offsets, stable permutation + inverse)      kernels/routing.py
  h_S2F = grouped GEMM with in-kernel gather of x_TD rows          kernels/grouped_gemm.py  (no permuted copy of x)
  h_SF  = silu(gate) * up, then act_fq (QAT int8 per row)         PyTorch elementwise
  h_SF *= router gate of each sorted row (F wide, fp32 multiply)   kernels/permute.py  scale_rows_triton
  y_SD  = grouped GEMM (down projection)                           kernels/grouped_gemm.py
  y_TD  = deterministic unweighted sum of each token's K slots     kernels/permute.py  combine_sum_triton

The gates multiply the down projection's input (W2 (g h) = g (W2 h), as the reference does): F << D, so the
scaling and the gate gradient (an F-wide dot per row) touch (S, F) instead of (S, D).
Dtypes: x_TD / weights bf16 (the model's CUDA precision policy) or fp32; gates_TK fp32 or the operand dtype.
Every GEMM accumulates in fp32 and rounds its output once to the operand dtype; the gate product is formed in
fp32 and rounded once; dgates is reduced in fp32 and returned in gates_TK's dtype.
Same signature and semantics as kernels.moe.moe_experts_reference; gradients flow to x_TD, gates_TK and both
weight tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.grouped_gemm import grouped_gemm_triton
from kernels.permute import combine_sum_triton, scale_rows_triton
from kernels.routing import routing_triton


def moe_experts_triton(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                       w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                       act_fq: Callable | None = None) -> torch.Tensor:
    T, K = ids_TK.shape
    E, F2, D = w_gate_up_EFD.shape
    if x_TD.shape != (T, D):
        raise ValueError(f"x_TD shape {tuple(x_TD.shape)} does not match ids_TK {tuple(ids_TK.shape)} and D={D}")
    if w_down_EDF.shape != (E, D, F2 // 2):
        raise ValueError(f"w_down_EDF shape {tuple(w_down_EDF.shape)}, expected {(E, D, F2 // 2)}")
    r = routing_triton(ids_TK, E)
    h_S2F = grouped_gemm_triton(x_TD, w_gate_up_EFD, r.offsets_E1, r.perm_S, r.inv_S, K)
    g_SF, u_SF = h_S2F.chunk(2, dim=-1)
    h_SF = F.silu(g_SF) * u_SF
    if act_fq is not None:
        h_SF = act_fq(h_SF)
    if gates_TK.shape != (T, K):
        raise ValueError(f"gates_TK shape {tuple(gates_TK.shape)} does not match ids_TK {tuple(ids_TK.shape)}")
    # gates stay in their dtype (fp32 from the router): multiplied in fp32 on the F side, dgates reduced in fp32
    h_SF = scale_rows_triton(h_SF, gates_TK, r.perm_S)
    y_SD = grouped_gemm_triton(h_SF, w_down_EDF, r.offsets_E1)
    return combine_sum_triton(y_SD, r.perm_S, r.inv_S, K)
