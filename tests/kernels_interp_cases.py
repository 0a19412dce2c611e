"""Triton kernels vs their PyTorch twins under the Triton CPU interpreter (values and gradients).

Not collected by the main suite (the name does not start with test_): tests/test_kernels_interp.py runs this
file in a separate pytest process with TRITON_INTERPRET=1 set before triton is imported. Everything is fp32
(the interpreter's bf16 tl.dot is wrong) except one bf16 forward that exercises the in-kernel fp32 upcast.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/kernels_interp_cases.py must run with TRITON_INTERPRET=1 (see test_kernels_interp.py)")

from kernels.grouped_gemm import grouped_gemm_backward_reference, grouped_gemm_reference, grouped_gemm_triton
from kernels.moe import moe_experts, moe_experts_reference
from kernels.permute import combine_reference, combine_weighted_triton, permute_reference, permute_triton
from kernels.router import route_reference
from kernels.router_triton import route_triton
from kernels.routing import routing_reference, routing_triton

ATOL = 2e-5


def _ids(T, K, E, g, used=None):
    """Random distinct top-k ids per token, drawn from `used` experts only (others stay empty)."""
    pool = torch.arange(E) if used is None else torch.tensor(used)
    rows = [pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)]
    return torch.stack(rows) if T else torch.zeros(0, K, dtype=torch.int64)


# (T, K, E, used experts): empty experts, T < block, E in {1, 8, 64}, k in {1, 2, 8}
SHAPES = [
    (1, 1, 1, None),
    (5, 2, 8, [1, 6]),            # fewer tokens than any block, 6 empty experts
    (37, 2, 8, [0, 2, 3, 5, 7]),  # ragged segments, empty experts 1, 4, 6
    (21, 8, 64, list(range(0, 64, 3))),
    (70, 1, 8, None),             # S=70 > 64: two routing blocks
]


@pytest.mark.parametrize("T,K,E,used", SHAPES)
def test_routing(T, K, E, used):
    g = torch.Generator().manual_seed(T * 100 + E)
    ids = _ids(T, K, E, g, used) if K <= (len(used) if used else E) else None
    ref = routing_reference(ids, E)
    for block in (16, 64):  # several blocks: the cross-block prefix and the stable in-block rank
        got = routing_triton(ids, E, block=block)
        for f in ("counts_E", "offsets_E1", "perm_S", "inv_S"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), (f, block)
    if used is not None:
        empty = [e for e in range(E) if e not in used]
        assert (ref.counts_E[empty] == 0).all()


def test_routing_empty_input():
    got = routing_triton(torch.zeros(0, 2, dtype=torch.int64), 8)
    assert got.counts_E.tolist() == [0] * 8 and got.offsets_E1.tolist() == [0] * 9 and got.perm_S.numel() == 0


@pytest.mark.parametrize("E,K", [(1, 1), (8, 2), (64, 8)])
@pytest.mark.parametrize("score,norm,bias", [("softmax", True, False), ("softmax", False, True),
                                             ("sigmoid", True, True), ("sigmoid", False, False)])
def test_router(E, K, score, norm, bias):
    g = torch.Generator().manual_seed(E + K)
    T = 19
    logits = torch.randn(T, E, generator=g) * 2
    bias_E = torch.randn(E, generator=g) * 0.3 if bias else None
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ids_r, gates_r, scores_r = route_reference(a, K, score, norm, bias_E)
    ids_t, gates_t, scores_t = route_triton(b, K, score, norm, bias_E)
    assert torch.equal(ids_r, ids_t)
    torch.testing.assert_close(gates_t, gates_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores_t, scores_r, atol=1e-6, rtol=1e-5)
    dg, ds = torch.randn(T, K, generator=g), torch.randn(T, E, generator=g)
    (gates_r * dg).sum().add((scores_r * ds).sum()).backward()
    (gates_t * dg).sum().add((scores_t * ds).sum()).backward()
    torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)


def test_router_bias_changes_selection_not_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    ids, gates, scores = route_triton(logits, 1, "sigmoid", False, bias)
    assert ids.item() == 3  # the bias moved the choice to expert 3 ...
    assert gates.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())  # ... at its unbiased score


@pytest.mark.parametrize("T,K,E,used", SHAPES[1:])
def test_permute_and_combine(T, K, E, used):
    g = torch.Generator().manual_seed(7 + T)
    D = 40  # not a multiple of the 32-column tile
    ids = _ids(T, K, E, g, used)
    r = routing_reference(ids, E)
    x = torch.randn(T, D, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    pa, pb = permute_reference(xa, r.perm_S, K), permute_triton(xb, r.perm_S, r.inv_S, K)
    assert torch.equal(pa, pb)
    dp = torch.randn(pa.shape, generator=g)
    (pa * dp).sum().backward()
    (pb * dp).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=ATOL, rtol=1e-5)

    y = torch.randn(T * K, D, generator=g)
    gates = torch.rand(T, K, generator=g)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    ga, gb = gates.clone().requires_grad_(), gates.clone().requires_grad_()
    oa = combine_reference(ya, r.inv_S, K, ga)
    ob = combine_weighted_triton(yb, gb, r.perm_S, r.inv_S, K)
    torch.testing.assert_close(ob, oa, atol=ATOL, rtol=1e-5)
    do = torch.randn(oa.shape, generator=g)
    (oa * do).sum().backward()
    (ob * do).sum().backward()
    torch.testing.assert_close(yb.grad, ya.grad, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(gb.grad, ga.grad, atol=ATOL, rtol=1e-5)
    # deterministic: a second run is bitwise identical
    assert torch.equal(combine_weighted_triton(yb, gb, r.perm_S, r.inv_S, K), ob)


@pytest.mark.parametrize("T,K,E,used", SHAPES)
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_gemm(T, K, E, used, gather):
    g = torch.Generator().manual_seed(11 + T + E)
    N, KD = 48, 40  # neither a multiple of the 64 / 32 tiles
    ids = _ids(T, K, E, g, used)
    r = routing_reference(ids, E)
    S = T * K
    x = torch.randn(T if gather else S, KD, generator=g)
    w = torch.randn(E, N, KD, generator=g) * 0.3
    perm, inv = (r.perm_S, r.inv_S) if gather else (None, None)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_gemm_triton(xt, wt, r.offsets_E1, perm, inv, K if gather else 1)
    torch.testing.assert_close(y, grouped_gemm_reference(x, w, r.offsets_E1, perm, K if gather else 1),
                               atol=1e-4, rtol=1e-5)
    dy = torch.randn(S, N, generator=g)
    y.backward(dy)
    dx_ref, dw_ref = grouped_gemm_backward_reference(x, w, r.offsets_E1, dy, perm, inv, K if gather else 1)
    torch.testing.assert_close(xt.grad, dx_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(wt.grad, dw_ref, atol=1e-4, rtol=1e-5)
    # the autograd twin: the reference through torch autograd gives the same gradients
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    xs = xr if perm is None else xr[perm.long() // K]
    cnt = r.counts_E.tolist()
    yr = torch.cat([xs_e @ wr[e].t() for e, xs_e in enumerate(xs.split(cnt))]) if S else xs.new_zeros(0, N)
    if S:
        yr.backward(dy)
        torch.testing.assert_close(xt.grad, xr.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(wt.grad, wr.grad, atol=1e-4, rtol=1e-5)
    if used is not None:  # experts with no rows get an exactly-zero weight gradient
        empty = [e for e in range(E) if e not in used]
        assert torch.count_nonzero(wt.grad[empty]) == 0


def test_grouped_gemm_bf16_forward():
    g = torch.Generator().manual_seed(3)
    E, T, K, N, KD = 8, 30, 2, 64, 64
    r = routing_reference(_ids(T, K, E, g), E)
    x = torch.randn(T, KD, generator=g).bfloat16()
    w = (torch.randn(E, N, KD, generator=g) * 0.2).bfloat16()
    y = grouped_gemm_triton(x, w, r.offsets_E1, r.perm_S, r.inv_S, K)
    ref = grouped_gemm_reference(x.float(), w.float(), r.offsets_E1, r.perm_S, K)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)


def _layer_inputs(T, K, E, D, F, seed, used=None):
    g = torch.Generator().manual_seed(seed)
    ids = _ids(T, K, E, g, used)
    x = torch.randn(T, D, generator=g)
    gates = torch.rand(T, K, generator=g)
    w13 = torch.randn(E, 2 * F, D, generator=g) * 0.2
    w2 = torch.randn(E, D, F, generator=g) * 0.2
    return x, ids, gates, w13, w2


@pytest.mark.parametrize("T,K,E,used,qat", [(13, 2, 8, [0, 1, 2, 5], False), (9, 8, 64, None, True)])
def test_moe_layer_triton_equals_reference(T, K, E, used, qat):
    from model.quant import fake_quant_act_int8  # noqa: PLC0415

    D, F = 32, 24
    x, ids, gates, w13, w2 = _layer_inputs(T, K, E, D, F, seed=T + E, used=used)
    act_fq = fake_quant_act_int8 if qat else None
    outs, grads = [], []
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, gates, w13, w2)]
        y = moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], backend=backend, act_fq=act_fq)
        y.backward(torch.ones_like(y) + torch.arange(D) / D)
        outs.append(y.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "gates", "w_gate_up", "w_down"), grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")
    # deterministic: the Triton layer reproduces itself bitwise
    y2 = moe_experts(x, ids, gates, w13, w2, backend="triton", act_fq=act_fq)
    assert torch.equal(y2, outs[1])
    assert torch.allclose(moe_experts_reference(x, ids, gates, w13, w2, act_fq), outs[0])


def test_whole_model_triton_backend_equals_reference():
    from model.config import get_config  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415

    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, n_experts=8, top_k=2,
              expert_ffn_dim=32, shared_ffn_dim=32, max_seq_len=32)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        m = MobileMoE(get_config("tiny", moe_backend=backend, **kw))
        m.init_weights(seed=0)
        logits = m(ids)
        loss = logits.float().logsumexp(-1).mean() + m.aux_loss()
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and any("w_gate_up" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")
