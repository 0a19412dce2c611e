"""moe_experts_triton: the dropless routed SwiGLU experts built from the Triton kernels, with autograd.

  routing (histogram, offsets, stable permutation + inverse)      kernels/routing.py
  h_S2F = grouped GEMM with in-kernel gather of x_TD rows          kernels/grouped_gemm.py  (no permuted copy of x)
  h_SF  = silu(gate) * up, then act_fq (QAT int8 per row)         PyTorch elementwise
  y_SD  = grouped GEMM (down projection)                           kernels/grouped_gemm.py
  y_TD  = deterministic weighted combine of each token's K slots   kernels/permute.py

Same signature and semantics as kernels.moe.moe_experts_reference; gradients flow to x_TD, gates_TK and both
weight tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.grouped_gemm import grouped_gemm_triton
from kernels.permute import combine_weighted_triton
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
    y_SD = grouped_gemm_triton(h_SF, w_down_EDF, r.offsets_E1)
    return combine_weighted_triton(y_SD, gates_TK.to(y_SD.dtype), r.perm_S, r.inv_S, K)
