"""The single MoE dispatch point: routed SwiGLU experts over dropless routing.

backend: "auto" (Triton on CUDA, reference on CPU), "triton", "reference", "megablocks" (optional CUDA extra).
The choice is logged once per (requested, resolved, device) triple.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("mobilemoe.kernels")
_logged: set = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        resolved = "triton" if device.type == "cuda" else "reference"
    elif backend in ("reference", "triton"):
        resolved = backend
    elif backend == "megablocks":
        if device.type != "cuda":
            raise RuntimeError("moe_backend='megablocks' needs a CUDA device (megablocks is CUDA-only)")
        try:
            import megablocks  # noqa: F401, PLC0415
        except ImportError as e:
            raise RuntimeError("moe_backend='megablocks' but megablocks is not installed "
                               "(pip install -e '.[cuda]' on a CUDA machine)") from e
        resolved = "megablocks"
    else:
        raise ValueError(f"unknown moe backend {backend!r}: auto|triton|reference|megablocks")
    key = (backend, resolved, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("MoE backend: %s (requested %s, device %s)", resolved, backend, device.type)
    return resolved


def moe_experts_reference(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                          w_gate_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                          act_fq: Callable | None = None) -> torch.Tensor:
    """Dropless routed SwiGLU experts in plain PyTorch.

    x_TD (T, D); ids_TK, gates_TK (T, K); w_gate_up_EFD (E, 2F, D) = [gate; up] rows; w_down_EDF (E, D, F).
    Sort token-slots by expert (stable), run each expert on its contiguous slice, weight, and sum each
    token's K slots back in slot order (deterministic: no atomics, no index_add).
    act_fq: optional per-row activation fake-quant applied to the down projection's input (QAT); the
    caller applies it to x_TD itself.
    """
    T, K = ids_TK.shape
    E = w_gate_up_EFD.shape[0]
    flat_S = ids_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    counts = torch.bincount(flat_S, minlength=E).tolist()
    x_SD = x_TD[order_S // K]
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = x_SD[start:start + n]
        g, u = (xe @ w_gate_up_EFD[e].t()).chunk(2, dim=-1)
        h = F.silu(g) * u
        if act_fq is not None:
            h = act_fq(h)
        outs.append(h @ w_down_EDF[e].t())
        start += n
    y_SD = torch.cat(outs, dim=0) if outs else x_SD.new_zeros(0, w_down_EDF.shape[1])
    y_SD = y_SD * gates_TK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
    inv_S = torch.empty_like(order_S)
    inv_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    return y_SD[inv_S].reshape(T, K, w_down_EDF.shape[1]).sum(dim=1)


def moe_experts(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, backend: str = "auto",
                act_fq: Callable | None = None) -> torch.Tensor:
    resolved = resolve_backend(backend, x_TD.device)
    if resolved == "reference":
        return moe_experts_reference(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    if resolved == "triton":
        from kernels.moe_triton import moe_experts_triton  # noqa: PLC0415  (imports triton)

        return moe_experts_triton(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
    from kernels.megablocks_adapter import moe_experts_megablocks  # noqa: PLC0415

    return moe_experts_megablocks(x_TD, ids_TK, gates_TK, w_gate_up_EFD, w_down_EDF, act_fq)
