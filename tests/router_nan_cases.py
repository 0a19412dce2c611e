"""Triton router vs the PyTorch reference on NaN / +inf / -inf router rows, under the Triton CPU interpreter.

Not collected by the main suite (the name does not start with test_): tests/test_router_nan.py runs this file
in a separate pytest process with TRITON_INTERPRET=1 set before triton is imported, like
tests/test_kernels_interp.py does for tests/kernels_interp_cases.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/router_nan_cases.py must run with TRITON_INTERPRET=1 (see test_router_nan.py)")

from kernels.router import route_reference
from kernels.router_triton import route_triton
from kernels.routing import routing_reference, routing_triton

NAN, INF = float("nan"), float("inf")
# the interpreter runs the kernel in numpy, which warns on the NaN / inf arithmetic these rows exist to exercise
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]
NORMAL_ROWS = (0, 9)  # rows without any non-finite logit


def bad_logits(E: int, g: torch.Generator) -> torch.Tensor:
    """11 rows: normal, one NaN, all NaN, +inf, two +inf, -inf, all -inf, mixed, half NaN, normal, all +inf.
    The special values sit in the last columns too, so with E = 60 they are next to the padded lanes."""
    x = torch.randn(11, E, generator=g) * 2
    x[1, E // 2] = NAN
    x[2] = NAN
    x[3, E - 1] = INF
    x[4, [1, E - 1]] = INF
    x[5, 0] = -INF
    x[6] = -INF
    x[7, [0, E // 3, E - 2, E - 1]] = torch.tensor([NAN, INF, -INF, NAN])
    x[8, ::2] = NAN
    x[10] = INF
    return x


def _check_ids(ids_TK: torch.Tensor, E: int, K: int) -> None:
    assert ids_TK.dtype == torch.int64 and ids_TK.shape[1] == K
    assert ((ids_TK >= 0) & (ids_TK < E)).all(), ids_TK
    assert (ids_TK.sort(-1).values.diff(dim=-1) > 0).all(), f"repeated id in a row: {ids_TK}"


@pytest.mark.parametrize("E", [8, 60, 64])
@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_nan_inf_rows_triton_equals_reference(E, K, score, bias):
    g = torch.Generator().manual_seed(E * 10 + K)
    logits = bad_logits(E, g)
    bias_E = torch.randn(E, generator=g) * 0.3 if bias else None
    norm = K != 4  # both renormalised and raw gates, over the matrix
    ids_r, gates_r, scores_r = route_reference(logits, K, score, norm, bias_E)
    ids_t, gates_t, scores_t = route_triton(logits, K, score, norm, bias_E)
    _check_ids(ids_r, E, K)
    _check_ids(ids_t, E, K)
    assert torch.equal(ids_t, ids_r)
    assert torch.equal(torch.isnan(gates_t), torch.isnan(gates_r))
    torch.testing.assert_close(gates_t, gates_r, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(scores_t, scores_r, atol=1e-6, rtol=1e-5, equal_nan=True)
    first_k = torch.arange(K)
    if score == "softmax":
        # any NaN / +inf logit or only -inf ones: all scores NaN -> ids 0..K-1 and NaN gates (propagated)
        for row in (1, 2, 3, 4, 6, 7, 8, 10):
            assert torch.equal(ids_r[row], first_k), (row, ids_r[row])
            assert torch.isnan(gates_r[row]).all(), row
    else:
        assert torch.equal(ids_r[2], first_k) and torch.isnan(gates_r[2]).all()  # all NaN
        if K <= E // 2:  # NaN ranks last: never picked while finite candidates are left
            for row in (1, 7, 8):
                assert not torch.isnan(scores_r[row, ids_r[row]]).any(), row
                assert torch.isfinite(gates_r[row]).all(), row
        if not bias:
            assert ids_r[3, 0].item() == E - 1 and scores_r[3, E - 1].item() == 1.0  # +inf -> score 1, picked first
            if not norm:
                assert gates_r[3, 0].item() == 1.0
            assert ids_r[4, :2].tolist() == [1, E - 1][:K]  # tied +inf (score 1.0): lower id first
            assert torch.equal(ids_r[6], first_k) and (gates_r[6] == 0).all()  # all -inf: scores 0, ties
            assert torch.equal(ids_r[10], first_k)  # all +inf: scores 1, ties
            if K < E:
                assert not (ids_r[5] == 0).any()  # -inf -> score 0 ranks below every finite logit


@pytest.mark.parametrize("E,K", [(8, 8), (60, 4), (64, 1), (60, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_dropless_routing_on_nan_ids(E, K, score):
    g = torch.Generator().manual_seed(E + K)
    logits = bad_logits(E, g).repeat(7, 1)  # S = 77 * K slots: several routing blocks
    ids, _, _ = route_triton(logits, K, score, True, None)
    _check_ids(ids, E, K)
    ref = routing_reference(ids, E)
    assert ref.counts_E.numel() == E and int(ref.counts_E.sum()) == ids.numel()
    for block in (16, 64):
        got = routing_triton(ids, E, block=block)
        for f in ("counts_E", "offsets_E1", "perm_S", "inv_S"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), (f, block)
    S = ids.numel()
    assert torch.equal(ref.perm_S.long().sort().values, torch.arange(S))
    assert torch.equal(ref.inv_S[ref.perm_S.long()].long(), torch.arange(S))
    # every sorted row lands in its expert's segment
    flat = ids.reshape(-1)
    rows_S = ref.inv_S.long()
    assert ((rows_S >= ref.offsets_E1[flat].long()) & (rows_S < ref.offsets_E1[flat + 1].long())).all()


@pytest.mark.parametrize("E,K", [(8, 4), (60, 8), (64, 1)])
@pytest.mark.parametrize("score,bias", [("softmax", False), ("sigmoid", True)])
def test_normal_rows_unchanged_values_and_grads(E, K, score, bias):
    """The finite rows of a batch with NaN/inf rows: same ids as torch.topk (the old selection), same gates,
    scores and logit grads as when routed alone, in both backends."""
    g = torch.Generator().manual_seed(E * 3 + K)
    logits = bad_logits(E, g)
    bias_E = torch.randn(E, generator=g) * 0.3 if bias else None
    normal = list(NORMAL_ROWS)
    dg, ds = torch.randn(11, K, generator=g), torch.randn(11, E, generator=g)
    alone = logits[normal].clone().requires_grad_()
    ids_a, gates_a, scores_a = route_reference(alone, K, score, True, bias_E)
    (gates_a * dg[normal]).sum().add((scores_a * ds[normal]).sum()).backward()
    sel = scores_a.detach() + (0 if bias_E is None else bias_E)
    assert torch.equal(ids_a, torch.topk(sel, K, dim=-1, sorted=True).indices)
    for fn in (route_reference, route_triton):
        x = logits.clone().requires_grad_()
        ids, gates, scores = fn(x, K, score, True, bias_E)
        (gates * dg).sum().add((scores * ds).sum()).backward()
        assert torch.equal(ids[normal], ids_a), fn.__name__
        torch.testing.assert_close(gates[normal], gates_a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scores[normal], scores_a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x.grad[normal], alone.grad, atol=1e-5, rtol=1e-4)
