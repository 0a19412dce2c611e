"""Router: score function (softmax | sigmoid, fp32) + top-k + optional renormalisation + selection bias.

The selection bias (auxiliary-loss-free balancing) changes *which* experts are picked, never the gate values.
"""

from __future__ import annotations

import torch


def route_reference(logits_TE: torch.Tensor, top_k: int, score: str = "softmax", norm_topk: bool = True,
                    bias_E: torch.Tensor | None = None):
    """Returns (ids_TK int64, gates_TK fp32, scores_TE fp32)."""
    logits_TE = logits_TE.float()
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise ValueError(f"router score must be softmax|sigmoid, got {score!r}")
    sel_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    ids_TK = torch.topk(sel_TE, top_k, dim=-1, sorted=True).indices
    gates_TK = torch.gather(scores_TE, 1, ids_TK)
    if norm_topk:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids_TK, gates_TK, scores_TE


def route(logits_TE, top_k, score="softmax", norm_topk=True, bias_E=None, backend: str = "reference"):
    if backend == "triton":
        from kernels.router_triton import route_triton  # noqa: PLC0415  (imports triton)

        return route_triton(logits_TE, top_k, score, norm_topk, bias_E)
    return route_reference(logits_TE, top_k, score, norm_topk, bias_E)


def load_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, n_experts: int, score: str = "softmax"):
    """Switch/megablocks LB loss  E * sum_e f_e * P_e  (f: fraction of token-slots, P: mean router prob)."""
    T, K = ids_TK.shape
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=n_experts).float()
    f_E = counts_E / (T * K)
    probs_TE = scores_TE if score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    P_E = probs_TE.mean(dim=0)
    return n_experts * torch.sum(f_E * P_E), counts_E


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
