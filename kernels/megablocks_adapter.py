"""Optional megablocks backend (CUDA only): our routing + the `grouped_gemm` package's CUTLASS gmm.

megablocks (and its grouped_gemm dependency) installs only with a CUDA toolkit, so this path is never
exercised on CPU machines; everywhere else it raises a clear RuntimeError. Not verified on a GPU here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def require_megablocks(device: torch.device):
    if device.type != "cuda":
        raise RuntimeError("moe_backend='megablocks' needs a CUDA device (megablocks is CUDA-only)")
    try:
        import megablocks  # noqa: F401, PLC0415
        from grouped_gemm import ops as gg_ops  # noqa: PLC0415  (megablocks' CUTLASS grouped GEMM)
    except ImportError as e:
        raise RuntimeError("moe_backend='megablocks' but megablocks/grouped_gemm is not installed "
                           "(pip install -e '.[cuda]' on a CUDA machine)") from e
    return gg_ops


def moe_experts_megablocks(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF,
                           act_fq: Callable | None = None) -> torch.Tensor:
    gg_ops = require_megablocks(x_TD.device)
    from kernels.permute import combine_weighted_triton, permute_triton  # noqa: PLC0415
    from kernels.routing import routing_triton  # noqa: PLC0415

    T, K = ids_TK.shape
    r = routing_triton(ids_TK, w_gate_up_EFD.shape[0])
    batch_sizes = r.counts_E.to("cpu", torch.int64)  # gmm takes per-expert sizes on the host
    x_SD = permute_triton(x_TD, r.perm_S, r.inv_S, K)
    h = gg_ops.gmm(x_SD, w_gate_up_EFD, batch_sizes, trans_b=True)  # weights are (E, N, Kd)
    g, u = h.chunk(2, dim=-1)
    h = F.silu(g) * u
    if act_fq is not None:
        h = act_fq(h)
    y_SD = gg_ops.gmm(h, w_down_EDF, batch_sizes, trans_b=True)
    return combine_weighted_triton(y_SD, gates_TK.to(y_SD.dtype), r.perm_S, r.inv_S, K)
