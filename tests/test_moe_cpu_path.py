"""kernels/moe_cpu.py (the CPU training path) against kernels.moe.moe_experts_reference: values and gradients."""

import logging

import pytest
import torch

import kernels.moe_cpu as kc
from kernels.moe import moe_experts, moe_experts_reference, resolve_backend
from model.quant import fake_quant_act_int8


def _case(T, D, Fh, E, K, seed, skew=0.0, empty=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g) + skew * torch.linspace(0, 3, E)
    for e in empty:  # experts that no token picks
        logits[:, e] = -1e4
    ids = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True).indices[:, :K]
    gates = torch.softmax(torch.randn(T, K, generator=g), -1)
    w13 = torch.randn(E, 2 * Fh, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, Fh, generator=g) * Fh ** -0.5
    dy = torch.randn(T, D, generator=g)
    return x, ids, gates, w13, w2, dy


def _run(fn, x, ids, gates, w13, w2, dy, **kw):
    leaves = [t.clone().requires_grad_() for t in (x, gates, w13, w2)]
    y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], **kw)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


CASES = [  # (T, D, F, E, K, seed, skew, empty experts)
    (64, 32, 16, 8, 2, 0, 0.0, ()),
    (96, 16, 8, 6, 3, 1, 0.0, (0, 4)),       # experts with zero tokens, first and middle
    (50, 24, 16, 5, 1, 2, 0.0, (4,)),        # the last expert empty, K = 1
    (80, 16, 8, 8, 2, 3, 4.0, ()),           # a skewed router: "auto" falls back to slices
    (1, 8, 8, 4, 4, 4, 0.0, ()),             # one token, K = E
]


@pytest.mark.parametrize("layout", ["slices", "padded", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_values_and_grads_match_reference(case, layout):
    *shape, skew, empty = case
    x, ids, gates, w13, w2, dy = _case(*shape, skew=skew, empty=empty)
    counts = torch.bincount(ids.reshape(-1), minlength=w13.shape[0])
    assert all(counts[e] == 0 for e in empty)
    ref = _run(moe_experts_reference, x, ids, gates, w13, w2, dy)
    new = _run(kc.moe_experts_cpu, x, ids, gates, w13, w2, dy, layout=layout)
    for name, a, b in zip(("y", "dx", "dgates", "dw_gate_up", "dw_down"), ref, new):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for e in empty:  # exact zero gradients for experts without tokens
        assert new[3][e].abs().max() == 0 and new[4][e].abs().max() == 0
    if layout == "slices":  # the same per-expert torch.mm calls in the same order: bit for bit
        for a, b in zip(ref, new):
            assert torch.equal(a, b)


def test_layout_choice_and_log(caplog):
    x, ids, gates, w13, w2, dy = _case(64, 16, 8, 8, 2, 0, skew=6.0)
    E, S = w13.shape[0], ids.numel()
    C = int(torch.bincount(ids.reshape(-1), minlength=E).max())
    assert E * C > (1 + kc.PAD_MAX_WASTE) * S  # skewed enough that padding would cost more than it saves
    assert kc._Layout(ids, E, "auto").kind == "slices"
    x, ids, gates, w13, w2, dy = _case(4096, 16, 8, 4, 1, 0)
    assert kc._Layout(ids, 4, "auto").kind == "padded"  # 4096 uniform slots over 4 experts: balanced
    kc._logged_layouts.clear()
    with caplog.at_level(logging.INFO, logger="mobilemoe.kernels"):
        kc._Layout(ids, 4, "auto")
        kc._Layout(ids, 4, "auto")
    assert sum("padded bmm layout" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_cpu_backend_dispatch(monkeypatch):
    assert resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "reference"  # measured no faster: opt-in
    calls = []
    real = kc._CpuExperts.apply
    monkeypatch.setattr(kc._CpuExperts, "apply", lambda *a: (calls.append(1), real(*a))[1])
    x, ids, gates, w13, w2, dy = _case(32, 16, 8, 4, 2, 0)
    y = moe_experts(x, ids, gates, w13, w2, backend="cpu")
    assert calls and torch.allclose(y, moe_experts_reference(x, ids, gates, w13, w2), rtol=1e-5, atol=1e-6)
    calls.clear()
    moe_experts(x, ids, gates, w13, w2, backend="reference")
    assert not calls  # the reference stays selectable and untouched


def test_qat_activation_fake_quant_and_bf16():
    x, ids, gates, w13, w2, dy = _case(64, 32, 32, 8, 2, 5)
    ref = _run(moe_experts_reference, x, ids, gates, w13, w2, dy, act_fq=fake_quant_act_int8)
    new = _run(kc.moe_experts_cpu, x, ids, gates, w13, w2, dy, act_fq=fake_quant_act_int8, layout="padded")
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    bf = [t.to(torch.bfloat16) for t in (x, w13, w2)]
    ref = _run(moe_experts_reference, bf[0], ids, gates, bf[1], bf[2], dy.bfloat16())
    new = _run(kc.moe_experts_cpu, bf[0], ids, gates, bf[1], bf[2], dy.bfloat16(), layout="slices")
    for a, b in zip(ref, new):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_no_tokens():
    x, ids, gates, w13, w2, dy = _case(0, 8, 8, 4, 2, 0)
    y, dx, dg, d13, d2 = _run(kc.moe_experts_cpu, x, ids, gates, w13, w2, dy)
    assert y.shape == (0, 8) and d13.abs().max() == 0 and d2.abs().max() == 0


def test_custom_op_with_cpu_backend():
    """Under torch.compile the experts run through mobilemoe::moe_experts; the cpu backend must pass its checks
    and give the eager path's values and gradients."""
    from kernels.moe import moe_experts_op

    x, ids, gates, w13, w2, dy = _case(24, 16, 8, 4, 2, 7)
    leaves = [t.clone().requires_grad_() for t in (x, gates, w13, w2)]
    torch.library.opcheck(moe_experts_op, (leaves[0], ids, leaves[1], leaves[2], leaves[3], "cpu", ""))
    via_op = _run(lambda a, i, g, b, c: moe_experts_op(a, i, g, b, c, "cpu", ""), x, ids, gates, w13, w2, dy)
    eager = _run(kc.moe_experts_cpu, x, ids, gates, w13, w2, dy)
    for a, b in zip(eager, via_op):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
