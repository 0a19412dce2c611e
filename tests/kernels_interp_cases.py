"""Triton kernels vs their PyTorch twins under the Triton CPU interpreter (values and gradients).

Not collected by the main suite (the name does not start with test_): tests/test_kernels_interp.py runs this
file in a separate pytest process with TRITON_INTERPRET=1 set before triton is imported. Mostly fp32 (the
interpreter's bf16 tl.dot is wrong: the GEMMs upcast bf16 tiles to fp32 there, UPCAST); the bf16 cases are a
grouped GEMM forward, the gate scaling with fp32 gates, and a whole layer with bf16 operands and fp32 gates
(what the model's CUDA precision policy feeds the Triton path). The cubin tests compile the same kernels for
bf16 on sm_80 / sm_90 (tests/test_kernels_compile.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/kernels_interp_cases.py must run with TRITON_INTERPRET=1 (see test_kernels_interp.py)")

from kernels.grouped_gemm import grouped_gemm_backward_reference, grouped_gemm_reference, grouped_gemm_triton
from kernels.moe import moe_experts, moe_experts_reference
from kernels.permute import (
    combine_reference,
    combine_sum_triton,
    combine_weighted_triton,
    permute_reference,
    permute_triton,
    scale_rows_triton,
)
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
    # several blocks (the cross-block prefix, the stable in-block rank) and several scan chunks of 2 blocks
    # (the parallel scan's column sums of earlier chunks; E = 64 also gives 4 expert groups)
    for block, chunk in ((16, None), (64, None), (16, 2)):
        got = routing_triton(ids, E, block=block, scan_chunk=chunk)
        for f in ("counts_E", "offsets_E1", "perm_S", "inv_S"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), (f, block, chunk)
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


@pytest.mark.parametrize("T,K,E,used", SHAPES[1:])
def test_gate_scale_and_unweighted_combine(T, K, E, used):
    """The F-side gate multiply (values, dh, dgates as an F-wide dot) and the unweighted combine (values, dy)."""
    g = torch.Generator().manual_seed(17 + T)
    F = 24  # not a multiple of the 32-column tile
    r = routing_reference(_ids(T, K, E, g, used), E)
    h = torch.randn(T * K, F, generator=g)
    gates = torch.rand(T, K, generator=g)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    ga, gb = gates.clone().requires_grad_(), gates.clone().requires_grad_()
    oa = ha * ga.reshape(-1)[r.perm_S.long()].unsqueeze(1)
    ob = scale_rows_triton(hb, gb, r.perm_S)
    torch.testing.assert_close(ob, oa, atol=ATOL, rtol=1e-5)
    do = torch.randn(oa.shape, generator=g)
    (oa * do).sum().backward()
    (ob * do).sum().backward()
    torch.testing.assert_close(hb.grad, ha.grad, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(gb.grad, ga.grad, atol=ATOL, rtol=1e-5)

    D = 40
    y = torch.randn(T * K, D, generator=g)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    ca = combine_reference(ya, r.inv_S, K)
    cb = combine_sum_triton(yb, r.perm_S, r.inv_S, K)
    torch.testing.assert_close(cb, ca, atol=ATOL, rtol=1e-5)
    dc = torch.randn(ca.shape, generator=g)
    (ca * dc).sum().backward()
    (cb * dc).sum().backward()
    assert torch.equal(yb.grad, ya.grad)  # the backward is a pure gather


def test_gate_scale_bf16_rows_fp32_gates():
    """bf16 rows x fp32 gates (the model's precision policy): product formed in fp32, rounded once; dgates fp32."""
    g = torch.Generator().manual_seed(5)
    T, K, E, F = 9, 2, 8, 24
    r = routing_reference(_ids(T, K, E, g), E)
    h = torch.randn(T * K, F, generator=g).bfloat16().requires_grad_()
    gates = torch.rand(T, K, generator=g).requires_grad_()
    out = scale_rows_triton(h, gates, r.perm_S)
    g_S1 = gates.detach().reshape(-1)[r.perm_S.long()].unsqueeze(1)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the fp32 product: within 1 ulp (the interpreter's fp32->bf16 cast may truncate
    # where the GPU rounds to nearest, so not bitwise)
    bf16_ulp = dict(atol=0.0, rtol=2.0 ** -7)
    torch.testing.assert_close(out.float(), h.detach().float() * g_S1, **bf16_ulp)
    do = torch.randn(T * K, F, generator=g).bfloat16()
    out.backward(do)
    assert gates.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    dg_ref = torch.zeros(T * K)
    dg_ref[r.perm_S.long()] = (do.float() * h.detach().float()).sum(1)
    torch.testing.assert_close(gates.grad.reshape(-1), dg_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.float(), do.float() * g_S1, **bf16_ulp)


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


def test_grouped_gemm_gpu_grid(monkeypatch):
    """The grid as planned on a GPU: cdiv(S, BM) + E M slots (no host sync), most past the last tile, mapped
    through the GROUP_M band swizzle with a last band shorter than GROUP_M; every (M tile, N tile) is still
    computed exactly once (y starts uninitialised) and the surplus programs exit."""
    import kernels.grouped_gemm as gg  # noqa: PLC0415

    monkeypatch.setattr(gg, "plans_for_gpu", lambda device: True)
    g = torch.Generator().manual_seed(23)
    T, K, E, N, KD = 37, 2, 8, 80, 40  # 3 N tiles of 32 (the last masked)
    r = routing_reference(_ids(T, K, E, g, [0, 2, 3, 5, 7]), E)
    x = torch.randn(T, KD, generator=g)
    w = torch.randn(E, N, KD, generator=g) * 0.3
    y, launch = gg.plan_gg_fwd(x, w, r.offsets_E1, r.perm_S, K)
    m_slots = launch.args[8]
    assert m_slots == -(-T * K // 16) + E and launch.grid == (m_slots * 3,)
    assert m_slots % launch.constexprs["GROUP_M"] == 1  # 13 slots in bands of 2: the last band is short
    launch.run()
    torch.testing.assert_close(y, grouped_gemm_reference(x, w, r.offsets_E1, r.perm_S, K), atol=1e-4, rtol=1e-5)


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


def test_moe_layer_bf16_operands_fp32_gates():
    """What the model's CUDA precision policy feeds the Triton path: bf16 x / w13 / w2, fp32 gates. Compared with
    the same layer in fp32 on the same (bf16-representable) values; the Triton path rounds each GEMM output and
    the gated rows to bf16, so the tolerance is bf16's (2^-8 relative) over a few roundings."""
    T, K, E, D, F = 11, 2, 8, 32, 24
    x, ids, gates, w13, w2 = _layer_inputs(T, K, E, D, F, seed=4)
    x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    res = []
    for dt in (torch.float32, torch.bfloat16):
        leaves = [x.to(dt).requires_grad_(), gates.clone().requires_grad_(), w13.to(dt).requires_grad_(),
                  w2.to(dt).requires_grad_()]
        y = moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], backend="triton")
        y.backward(torch.ones_like(y))
        res.append((y, [t.grad for t in leaves]))
    (y32, g32), (y16, g16) = res
    assert y16.dtype == torch.bfloat16 and g16[1].dtype == torch.float32 and g16[0].dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("x", "gates", "w_gate_up", "w_down"), g32, g16):
        torch.testing.assert_close(b.float(), a, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"grad {n}: {m}")


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
