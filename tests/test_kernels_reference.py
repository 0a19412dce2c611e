"""The PyTorch twins (the CPU path) against brute force, and the backend dispatch rules. No Triton launches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.grouped_gemm import grouped_gemm_reference
from kernels.moe import moe_experts, moe_experts_reference, resolve_backend
from kernels.permute import combine_reference, permute_reference
from kernels.router import route_reference
from kernels.routing import routing_reference


def _naive_moe(x, ids, gates, w13, w2):
    """Per-token, per-slot loop: the definition of the routed SwiGLU experts."""
    T, K = ids.shape
    out = torch.zeros_like(x)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            g, u = (w13[e] @ x[t]).chunk(2)
            out[t] += gates[t, k] * (w2[e] @ (F.silu(g) * u))
    return out


def test_routing_reference_is_a_stable_counting_sort():
    g = torch.Generator().manual_seed(0)
    E = 9
    ids = torch.randint(0, E - 2, (23, 3), generator=g)  # experts 7 and 8 stay empty
    r = routing_reference(ids, E)
    flat = ids.reshape(-1).tolist()
    expect = sorted(range(len(flat)), key=lambda i: (flat[i], i))  # by expert, then original slot
    assert r.perm_S.tolist() == expect
    assert r.counts_E.tolist() == [flat.count(e) for e in range(E)]
    assert r.offsets_E1[0] == 0 and r.offsets_E1[-1] == len(flat) and r.counts_E[7:].tolist() == [0, 0]
    assert torch.equal(r.inv_S[r.perm_S.long()], torch.arange(len(flat), dtype=torch.int32))


def test_permute_combine_reference_round_trip():
    g = torch.Generator().manual_seed(1)
    T, K, E, D = 11, 3, 5, 7
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    r = routing_reference(ids, E)
    x = torch.randn(T, D, generator=g)
    x_SD = permute_reference(x, r.perm_S, K)
    assert torch.equal(combine_reference(x_SD, r.inv_S, K), x * K)  # each token came back K times
    gates = torch.rand(T, K, generator=g)
    torch.testing.assert_close(combine_reference(x_SD, r.inv_S, K, gates), x * gates.sum(1, keepdim=True))


def test_grouped_gemm_reference_matches_per_row_products():
    g = torch.Generator().manual_seed(2)
    E, T, K, N, KD = 6, 10, 2, 5, 4
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    r = routing_reference(ids, E)
    x = torch.randn(T, KD, generator=g)
    w = torch.randn(E, N, KD, generator=g)
    y = grouped_gemm_reference(x, w, r.offsets_E1, r.perm_S, K)
    flat = ids.reshape(-1)
    for s, slot in enumerate(r.perm_S.tolist()):
        torch.testing.assert_close(y[s], w[flat[slot]] @ x[slot // K])


def _check_moe_reference_against_naive(ids, E, K, g):
    """moe_experts_reference (every method) vs _naive_moe: values, all four grads, determinism. Returns the
    leaf grads of the last method."""
    T, D, Fh = ids.shape[0], 12, 8
    leaves = [torch.randn(T, D, generator=g), torch.rand(T, K, generator=g),
              torch.randn(E, 2 * Fh, D, generator=g) * 0.3, torch.randn(E, D, Fh, generator=g) * 0.3]
    b = [t.clone().requires_grad_() for t in leaves]
    yb = _naive_moe(b[0], ids, b[1], b[2], b[3])
    dy = torch.randn(yb.shape, generator=g)
    yb.backward(dy)
    for method in ("auto", "padded", "slices", "grouped_mm"):
        a = [t.clone().requires_grad_() for t in leaves]
        ya = moe_experts_reference(a[0], ids, a[1], a[2], a[3], method=method)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5, msg=lambda m, k=method: f"{k}: {m}")
        ya.backward(dy)
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga.grad, gb.grad, atol=1e-4, rtol=1e-4, msg=lambda m, k=method: f"{k}: {m}")
        again = moe_experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], method=method)
        assert torch.equal(again, ya.detach())  # deterministic
    return [t.grad for t in a]


# each set leaves some experts with zero tokens: the first, the last, and runs in the middle, where an
# off-by-one in the offsets or an empty slice/padded group would show
@pytest.mark.parametrize("E,K,empty", [(2, 1, (0,)), (8, 2, (3, 7)), (16, 8, (0, 5, 6, 15)), (16, 1, (1, 2, 3, 9))])
def test_moe_reference_matches_naive_loop_with_empty_experts(E, K, empty):
    g = torch.Generator().manual_seed(E * 10 + K)
    T = 17
    live = torch.tensor([e for e in range(E) if e not in empty])
    # token t takes K consecutive experts of a shuffled cycle over the live ones, in shuffled slot order: K
    # distinct ids per token, as the router gives, and every live expert is reached since T * K >= len(live)
    cycle = live[torch.randperm(len(live), generator=g)]
    ids = torch.stack([cycle.roll(-t * K)[:K][torch.randperm(K, generator=g)] for t in range(T)])
    counts_E = torch.bincount(ids.reshape(-1), minlength=E)
    assert tuple((counts_E == 0).nonzero().flatten().tolist()) == empty  # exactly these experts get no token
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token, as the router gives
    _, _, dw13, dw2 = _check_moe_reference_against_naive(ids, E, K, g)
    idle = list(empty)
    assert not dw13[idle].any() and not dw2[idle].any()  # an expert no token reached gets no gradient
    assert dw13[live].abs().sum(dim=(1, 2)).gt(0).all()


def test_moe_reference_single_expert_matches_naive_loop():
    g = torch.Generator().manual_seed(11)
    _check_moe_reference_against_naive(torch.zeros(17, 1, dtype=torch.long), 1, 1, g)


@pytest.mark.parametrize("method", ["auto", "padded", "slices", "grouped_mm"])
def test_moe_reference_handles_zero_tokens(method):
    w13 = torch.randn(4, 8, 8, requires_grad=True)
    w2 = torch.randn(4, 8, 4, requires_grad=True)
    x = torch.zeros(0, 8, requires_grad=True)
    y = moe_experts_reference(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), w13, w2, method=method)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert w13.grad is not None and torch.count_nonzero(w13.grad) == 0


def test_moe_reference_collapsed_router_does_not_pad():
    T, K, E, D, Fh = 40, 1, 8, 4, 2
    ids = torch.zeros(T, K, dtype=torch.long)  # a collapsed router: every token on expert 0 -> C = T
    args = (torch.randn(T, D), ids, torch.ones(T, K), torch.randn(E, 2 * Fh, D), torch.randn(E, D, Fh))
    shapes = []
    moe_experts_reference(*args, act_fq=lambda h: (shapes.append(tuple(h.shape)), h)[1])
    assert shapes == [(T * K, Fh)]  # slices, not an (E * T, F) padded buffer
    torch.testing.assert_close(moe_experts_reference(*args), _naive_moe(*args), atol=1e-5, rtol=1e-5)


def test_moe_reference_applies_act_fq_to_down_proj_input():
    g = torch.Generator().manual_seed(3)
    T, K, E, D, Fh = 5, 2, 4, 8, 4  # grouped_mm needs 16-byte row strides
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    args = (torch.randn(T, D, generator=g), ids, torch.rand(T, K, generator=g),
            torch.randn(E, 2 * Fh, D, generator=g), torch.randn(E, D, Fh, generator=g))
    for method in ("slices", "padded", "grouped_mm"):
        seen = []
        y0 = moe_experts_reference(*args, act_fq=lambda h, seen=seen: (seen.append(h.shape), h * 0)[1], method=method)
        assert torch.count_nonzero(y0) == 0 and seen and all(s[-1] == Fh for s in seen), method
        rows = sum(s[0] for s in seen)
        assert rows == T * K if method != "padded" else rows >= T * K, method


def test_router_reference_bias_selects_but_does_not_scale():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    ids, gates, scores = route_reference(logits, 2, "softmax", False, torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(gates, scores[:, [3, 0]])


def test_backend_dispatch_rules():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("triton", cpu) == "triton"
    with pytest.raises(RuntimeError, match="megablocks"):
        resolve_backend("megablocks", cpu)
    with pytest.raises(ValueError, match="unknown moe backend"):
        resolve_backend("cutlass", cpu)
    x, ids, gates = torch.randn(3, 4), torch.tensor([[0], [1], [0]]), torch.ones(3, 1)
    w13, w2 = torch.randn(2, 4, 4), torch.randn(2, 4, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        moe_experts(x, ids, gates, w13, w2, backend="megablocks")
    from kernels.megablocks_adapter import moe_experts_megablocks  # noqa: PLC0415

    with pytest.raises(RuntimeError, match="CUDA"):
        moe_experts_megablocks(x, ids, gates, w13, w2)
    torch.testing.assert_close(moe_experts(x, ids, gates, w13, w2, backend="auto"),
                               moe_experts_reference(x, ids, gates, w13, w2))


def test_model_backend_comes_from_config():
    from model.config import get_config  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415

    with pytest.raises(ValueError, match="moe_backend"):
        get_config("tiny", moe_backend="cuda-magic")
    m = MobileMoE(get_config("tiny", moe_backend="reference", n_layers=1, vocab_size=64))
    assert all(b.moe.cfg.moe_backend == "reference" for b in m.layers if getattr(b, "moe", None) is not None)
