"""Router: score function (softmax | sigmoid, fp32) + top-k + optional renormalisation + selection bias.

The selection bias (auxiliary-loss-free balancing) changes *which* experts are picked, never the gate values.

Selection rule (shared exactly by route_reference, the Triton kernel and the C engine's router):
  sel = score (+ bias); a NaN sel ranks like -inf; the k ids are the k largest sel, ties -> the lower expert id,
  each id used once. So ids are always k distinct ids in [0, E), whatever the logits: a row whose selection
  scores are all NaN (a softmax row with a NaN logit) picks experts 0..k-1 (on a GPU an unmasked argmax could
  otherwise return a padded column, and the dropless routing scatter would index out of bounds).
Gate rule: gates are the unbiased scores at those ids, renormalised if asked, with NaN *propagated*, not hidden:
  softmax of a row holding any NaN or +inf logit, or only -inf logits, is NaN everywhere, so that token's gates
  (and the loss) are NaN and train/loop.py's non-finite-loss check stops at that step. Sigmoid scores are
  per expert: +inf -> 1, -inf -> 0, NaN -> NaN (ranked last, so it only reaches the gates when k forces it).
"""

from __future__ import annotations

import torch


def route_reference(logits_TE: torch.Tensor, top_k: int, score: str = "softmax", norm_topk: bool = True,
                    bias_E: torch.Tensor | None = None):
    """Returns (ids_TK int64, gates_TK fp32, scores_TE fp32)."""
    if logits_TE.dim() != 2 or not 1 <= top_k <= logits_TE.shape[-1]:
        raise ValueError(f"route: need 2-D logits (T, E) and 1 <= top_k <= E, got shape {tuple(logits_TE.shape)}, "
                         f"top_k={top_k}")
    logits_TE = logits_TE.float()
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise ValueError(f"router score must be softmax|sigmoid, got {score!r}")
    sel_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    sel_TE = torch.where(torch.isnan(sel_TE), float("-inf"), sel_TE)
    # a stable descending sort, not topk: ties (an all -inf row, equal scores) must go to the lower id, as in
    # the kernel; topk leaves the order of equal values unspecified
    ids_TK = torch.sort(sel_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]
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
    # a fixed-length count (not bincount, whose output length depends on the ids' values and makes
    # torch.compile break the graph); integer adds, so exact in any order
    flat = ids_TK.reshape(-1)
    counts_E = flat.new_zeros(n_experts).scatter_add(0, flat, torch.ones_like(flat)).float()
    f_E = counts_E / (T * K)
    probs_TE = scores_TE if score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    P_E = probs_TE.mean(dim=0)
    return n_experts * torch.sum(f_E * P_E), counts_E


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
