"""The INT4 g32 / int8-per-token format of model/quant.py: exact values, packing layout, STE gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.quant import (
    GROUP,
    dequantize_int4,
    fake_quant_act_int8,
    fake_quant_int4,
    int4_bytes,
    pack_int4,
    quantize_act_int8,
    quantize_int4,
    unpack_int4,
)


def test_pack_layout_is_q4_0_style():
    """Byte i of a group holds element i (low nibble) and element i+16 (high nibble), offset by +8."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    q[0, 16:] = torch.flip(q[0, 16:], [0])
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (1, 16)
    for i in range(16):
        assert int(p[0, i]) & 0xF == int(q[0, i]) + 8
        assert int(p[0, i]) >> 4 == int(q[0, i + 16]) + 8


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, groups * GROUP), generator=g, dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (rows, groups * GROUP // 2)
    assert torch.equal(unpack_int4(p), q)


def test_quantize_values_exact():
    # one group with amax 7 -> scale exactly 1.0; ties round half to even; out-of-range clamps to [-8, 7]
    w = torch.zeros(1, 32)
    w[0, :8] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49])
    q, s = quantize_int4(w)
    assert s.dtype == torch.float16 and s.shape == (1, 1) and float(s) == 1.0
    assert q[0, :8].tolist() == [7, 0, 2, 2, 0, -2, -2, 3]
    # -amax maps to -7 (symmetric), never to -8
    q2, _ = quantize_int4(-w)
    assert int(q2.min()) == -7
    # an all-zero group: scale 1, codes 0
    qz, sz = quantize_int4(torch.zeros(2, 64))
    assert torch.equal(qz, torch.zeros(2, 64, dtype=torch.int8)) and torch.equal(sz, torch.ones(2, 2, dtype=torch.float16))


def test_quantize_dequantize_error_bound_and_idempotence():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 96, generator=g) * torch.logspace(-3, 1, 96)  # groups at very different scales
    q, s = quantize_int4(w)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert s.shape == (6, 4, 3)
    w_hat = dequantize_int4(q, s)
    step = s.float().repeat_interleave(GROUP, dim=-1)
    # rounding error at most half a step (the fp16 scale can sit slightly below amax/7: allow its rounding)
    assert ((w - w_hat).abs() <= step * 0.5 + step * 2**-10 * 8).all()
    # dequantized weights are exactly representable: quantizing them again gives the same codes and scales
    q2, s2 = quantize_int4(w_hat)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    # fake quant = dequantize(quantize), bit for bit
    assert torch.equal(fake_quant_int4(w), w_hat)


def test_bad_group_is_value_error():
    with pytest.raises(ValueError, match="multiple of the quant group"):
        quantize_int4(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="multiple of the quant group"):
        pack_int4(torch.zeros(2, 40, dtype=torch.int8))


def test_ste_gradients_pass_straight_through():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=g, requires_grad=True)
    c = torch.randn(4, 64, generator=g)
    (fake_quant_int4(w) * c).sum().backward()
    assert torch.equal(w.grad, c)
    x = torch.randn(3, 5, 32, generator=g, requires_grad=True)
    c2 = torch.randn(3, 5, 32, generator=g)
    (fake_quant_act_int8(x) * c2).sum().backward()
    assert torch.equal(x.grad, c2)


def test_act_int8_per_token():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 48, generator=g) * torch.tensor([0.01, 1.0, 100.0, 3.0, 0.0]).unsqueeze(-1)
    q, a = quantize_act_int8(x)
    assert q.dtype == torch.int8 and a.dtype == torch.float32 and a.shape == (5,)
    assert float(a[4]) == 1.0 and torch.count_nonzero(q[4]) == 0  # zero row
    assert (q[:4].abs().amax(-1) == 127).all()  # the row's amax maps to +-127
    x_hat = q.float() * a.unsqueeze(-1)
    assert ((x - x_hat).abs() <= a.unsqueeze(-1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(fake_quant_act_int8(x), x_hat)


def test_int4_bytes_formula_matches_packed_storage():
    w = torch.randn(24, 160)
    q, s = quantize_int4(w)
    assert int4_bytes(w.numel()) == pack_int4(q).numel() + s.numel() * 2
    assert int4_bytes(32) * 8 == 32 * 4.5  # 4.5 bits per weight
