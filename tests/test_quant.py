"""The INT4 g32 / int8-per-token format of model/quant.py: exact values, packing layout, STE gradients, the scale
rule's edge cases (zero / tiny / huge / NaN), the C kernels following it byte for byte, and the exporters' errors
for non-finite weights."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
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
    # an all-zero group: the smallest normal fp16 scale, codes 0
    qz, sz = quantize_int4(torch.zeros(2, 64))
    assert torch.equal(qz, torch.zeros(2, 64, dtype=torch.int8))
    assert torch.equal(sz, torch.full((2, 2), 2.0**-14, dtype=torch.float16))


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
    assert float(a[4]) == 2.0**-126 and torch.count_nonzero(q[4]) == 0  # zero row: the smallest normal fp32
    assert (q[:4].abs().amax(-1) == 127).all()  # the row's amax maps to +-127
    x_hat = q.float() * a.unsqueeze(-1)
    assert ((x - x_hat).abs() <= a.unsqueeze(-1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(fake_quant_act_int8(x), x_hat)


def test_int4_bytes_formula_matches_packed_storage():
    w = torch.randn(24, 160)
    q, s = quantize_int4(w)
    assert int4_bytes(w.numel()) == pack_int4(q).numel() + s.numel() * 2
    assert int4_bytes(32) * 8 == 32 * 4.5  # 4.5 bits per weight


# ---------- edge cases: the one scale rule (model/quant.py docstring, mobile/FORMAT.md) ----------

FP16_MIN_NORMAL = 2.0**-14
FLT_MIN, FLT_MAX = 2.0**-126, float(np.finfo(np.float32).max)


def _edge_weights() -> torch.Tensor:
    """(6, 128): rows of 4 groups each covering one edge: all-zero, tiny (amax / 7 an fp16 subnormal), underflow
    (amax / 7 rounds to fp16 0), huge (amax / 7 > 65504: fp16 65504 or inf), mixed (the four in one row)."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(6, 128, generator=g)
    w = torch.zeros(6, 128)
    r1 = r[1].reshape(4, 32)  # each group's amax 4e-4: amax / 7 ~ 5.7e-5 < 2^-14, an fp16 subnormal
    w[1] = (r1 / r1.abs().amax(-1, keepdim=True) * 4e-4).reshape(128)
    w[2] = r[2] * 1e-9              # amax / 7 ~ 4e-10: fp16 0 (the old rule gave scale 1 and zeroed it)
    w[3] = r[3] * 1e6               # amax / 7 ~ 4e5 >= 65520: fp16 inf
    r4 = r[4].reshape(4, 32)  # each group's amax / 7 just above 65504: fp16 rounds it to 65504
    w[4] = (r4 / r4.abs().amax(-1, keepdim=True) * (65504 * 7 * 1.0001)).reshape(128)
    w[5, 0:32], w[5, 32:64], w[5, 64:96], w[5, 96:128] = 0.0, r[5, 32:64] * 1e-6, r[5, 64:96] * 3e7, r[5, 96:128]
    return w


def test_weight_scales_are_always_normal_fp16():
    w = _edge_weights()
    q, s = quantize_int4(w)
    s32 = s.float()
    assert torch.isfinite(s32).all() and (s32 >= FP16_MIN_NORMAL).all() and (s32 <= 65504).all()
    assert (s32[0] == FP16_MIN_NORMAL).all() and (q[0] == 0).all()  # all-zero groups
    assert (s32[1:3] == FP16_MIN_NORMAL).all()                       # tiny and underflowing groups
    assert (s32[3:5] == 65504).all()                                 # huge groups, both fp16 roundings
    assert s32[5].tolist() == [FP16_MIN_NORMAL, FP16_MIN_NORMAL, 65504.0,
                               float((w[5, 96:].abs().amax() / 7).half())]
    # tiny groups: codes are w / 2^-14 rounded (not flushed to 0), each weight within 2^-15
    assert torch.equal(q[1], torch.round(w[1] / FP16_MIN_NORMAL).to(torch.int8)) and q[1].abs().max() >= 1
    assert ((dequantize_int4(q[1:3], s[1:3]) - w[1:3]).abs() <= 2.0**-15).all()
    assert (q[2] == 0).all()  # |w| ~ 1e-9 << 2^-15
    # huge groups saturate at -8 / 7, the sign kept
    assert (q[3] == torch.clamp(torch.round(w[3] / 65504), -8, 7)).all() and set(q[3].unique().tolist()) >= {-8, 7}
    assert (torch.sign(q[3]) == torch.sign(torch.round(w[3] / 65504))).all()
    # the dequantized edge tensor is a fixed point of the rule (exactly representable)
    q2, s2 = quantize_int4(dequantize_int4(q, s))
    assert torch.equal(q2, q) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_dequantize_quantize_on_edge_groups(dtype):
    w = _edge_weights().to(dtype)
    q, s = quantize_int4(w)
    want = dequantize_int4(q, s).to(dtype)
    got = fake_quant_int4(w)
    assert got.dtype == dtype and torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                              want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.isfinite(got.float()).all()


def test_non_finite_weights_nan_scale_inf_is_huge():
    """Documented behaviour for QAT (the exporters reject both): inf -> a huge group, NaN -> NaN scale."""
    w = torch.zeros(2, 32)
    w[0, 3] = float("inf")
    w[0, 4] = 1.0
    w[1, 5] = float("nan")
    q, s = quantize_int4(w)
    assert float(s[0]) == 65504 and int(q[0, 3]) == 7 and int(q[0, 4]) == 0
    assert torch.isnan(s[1].float()).all()


def _edge_act_rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    nan, inf = float("nan"), float("inf")
    r = torch.randn(160, generator=g)
    rows = [
        torch.zeros(96),                                        # zero row
        r[:96] * 1e-42,                                          # subnormal inputs, amax / 127 underflows to 0
        r[:64] * 1e-39,                                          # amax / 127 subnormal
        r[:64] * 1e-36,                                          # amax / 127 normal, tiny
        torch.tensor([1.5, -0.5, 0.75, 2.5] * 8) * 2.0**-128,    # ties against the FLT_MIN scale
        torch.full((40,), FLT_MAX) * torch.tensor([1.0, -1.0] * 20),  # huge but finite
        torch.cat([r[:33] * 3e38, torch.tensor([-inf])]),        # an inf: scale FLT_MAX
        torch.tensor([inf, -inf] * 16),
        torch.tensor([nan] * 37),                                # all NaN: a zero row
        torch.cat([r[:70], torch.tensor([nan, -nan]), r[70:90] * 1e-40]),  # mixed, K = 92 (SIMD tail)
        r * 3,
    ]
    return rows


def test_act_edge_rows_follow_the_rule():
    for x in _edge_act_rows():
        q, a = quantize_act_int8(x)
        xf = torch.where(torch.isnan(x), 0.0, x)
        amax = float(xf.abs().max())
        want_a = min(max(np.float32(amax) / np.float32(127), np.float32(FLT_MIN)), np.float32(FLT_MAX))
        assert float(a) == float(want_a) and np.isfinite(float(a)) and float(a) >= FLT_MIN
        assert (q[torch.isnan(x)] == 0).all()
        assert q.abs().max() <= 127
    q, a = quantize_act_int8(torch.zeros(3, 8))
    assert (a == FLT_MIN).all() and (q == 0).all()
    q, a = quantize_act_int8(torch.tensor([1.5, -0.5, 0.75, 2.5]) * 2.0**-128)  # x / a = 0.375, -0.125, 0.1875, 0.625
    assert float(a) == FLT_MIN and q.tolist() == [0, 0, 0, 1]
    q, a = quantize_act_int8(torch.tensor([float("inf"), 3e38, -2e38, 1.0, float("nan")]))
    assert float(a) == FLT_MAX and q.tolist() == [127, 1, -1, 0, 0]  # 3e38 / FLT_MAX = 0.88, -2e38 -> -0.59


# ---------- the C engine follows the same rule byte for byte ----------

CDIR = Path(__file__).resolve().parent.parent / "mobile" / "c"


class _KernelSet(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("gemv", ctypes.c_void_p), ("gemm", ctypes.c_void_p),
                ("quantize", ctypes.c_void_p)]


class _Q4Matrix(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("rows", ctypes.c_int), ("cols", ctypes.c_int)]


_QUANT_FN = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_GEMV_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_int)


@pytest.fixture(scope="module")
def ksets(tmp_path_factory) -> list[tuple[str, object, object]]:
    """Every kernel set this CPU offers (scalar + SIMD), from the engine's kernel sources built as one .so with
    the per-file SIMD flags of kernels.mk."""
    if shutil.which("cc") is None:
        pytest.skip("cc not found (run mobile/install_toolchain.sh as root)")
    d = tmp_path_factory.mktemp("kq")
    simd = {"kernels_avx2.c": ["-mavx2", "-mfma", "-mf16c"]} if os.uname().machine == "x86_64" else {}
    objs = []
    for src in ["fp16.c", "cpu_features.c", *sorted(p.name for p in CDIR.glob("kernels_*.c"))]:
        o = d / (src + ".o")
        cmd = ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-fPIC", "-pthread",
               *simd.get(src, []), "-c", str(CDIR / src), "-o", str(o)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        objs.append(str(o))
    so = d / "libkq.so"
    r = subprocess.run(["cc", "-shared", *objs, "-o", str(so), "-lm", "-pthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    lib.mmoe_kernels_available.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.mmoe_kernels_by_name.restype = ctypes.POINTER(_KernelSet)
    lib.mmoe_kernels_by_name.argtypes = [ctypes.c_char_p]
    names, avail = [], lib.mmoe_kernels_available()
    while avail[len(names)]:
        names.append(avail[len(names)])
    out = []
    for n in names:
        k = lib.mmoe_kernels_by_name(n).contents
        out.append((n.decode(), _QUANT_FN(k.quantize), _GEMV_FN(k.gemv)))
    assert out[0][0] == "scalar"
    return out


def test_c_activation_quantizers_match_torch_on_edge_rows(ksets):
    for x in _edge_act_rows():
        q_ref, a_ref = quantize_act_int8(x)
        xf = np.ascontiguousarray(x.numpy().astype(np.float32))
        for name, quant, _gemv in ksets:
            q = np.full(xf.shape[0], 99, dtype=np.int8)
            a = quant(xf.ctypes.data, q.ctypes.data, xf.shape[0])
            assert np.float32(a).view(np.uint32) == a_ref.numpy().view(np.uint32), (name, x[:4])
            assert np.array_equal(q, q_ref.numpy()), (name, x[:4], q, q_ref)


def test_c_gemv_reads_edge_scales_as_torch_dequantizes(ksets):
    """The engine's INT4 matmul of the edge tensor: one-hot activations read back every dequantized weight
    exactly (the engine's dequant), and a random activation gives the contract's fp32 arithmetic on torch's
    q and s, in every kernel set."""
    w = _edge_weights()
    rows, K = w.shape
    q_w, s16 = quantize_int4(w)
    w_hat = dequantize_int4(q_w, s16).numpy()
    qs = pack_int4(q_w).numpy().astype(np.uint8).copy()
    d = s16.view(torch.int16).numpy().astype(np.uint16).copy()
    W = _Q4Matrix(qs.ctypes.data, d.ctypes.data, rows, K)
    y = np.zeros(rows, dtype=np.float32)
    for name, _quant, gemv in ksets:
        got = np.zeros((rows, K), dtype=np.float32)
        for k in range(K):
            xq = np.zeros(K, dtype=np.int8)
            xq[k] = 1
            gemv(ctypes.addressof(W), xq.ctypes.data, 1.0, y.ctypes.data, 0, rows)
            got[:, k] = y
        assert np.array_equal(got.view(np.uint32), w_hat.view(np.uint32)), name
    g = torch.Generator().manual_seed(5)
    x = torch.randn(K, generator=g)
    q_x, a = quantize_act_int8(x)
    xq = q_x.numpy().copy()
    isum = (q_w.numpy().astype(np.int64).reshape(rows, K // 32, 32) * xq.astype(np.int64).reshape(1, K // 32, 32)).sum(-1)
    acc = np.zeros(rows, dtype=np.float32)
    for gi in range(K // 32):
        acc = (acc + isum[:, gi].astype(np.float32) * s16.float().numpy()[:, gi]).astype(np.float32)
    want = (acc * np.float32(a.item())).astype(np.float32)
    assert np.isfinite(want).all()
    for name, _quant, gemv in ksets:
        y[:] = np.nan
        gemv(ctypes.addressof(W), xq.ctypes.data, float(a), y.ctypes.data, 0, rows)
        assert np.array_equal(y.view(np.uint32), want.view(np.uint32)), name


# ---------- NaN / inf weights are an export error naming the tensor ----------


@pytest.fixture()
def tiny_model_dir(tmp_path):
    from model.config import get_config  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415

    torch.manual_seed(0)
    return MobileMoE(get_config("tiny", n_layers=4)), tmp_path


@pytest.mark.parametrize("where,want", [
    ("wq", "layers.3.attn.wq: 2 non-finite values"),
    ("experts", "layers.1.moe.experts (w_down): 1 non-finite value "),
    ("norm", "norm: 1 non-finite value "),
])
def test_mmoe_export_rejects_non_finite_weights(tiny_model_dir, where, want):
    from mobile.export import export_model_dir  # noqa: PLC0415
    from model.io import save_model_dir  # noqa: PLC0415

    model, tmp = tiny_model_dir
    with torch.no_grad():
        if where == "wq":
            model.layers[3].attn.wq.weight[5, 7] = float("nan")
            model.layers[3].attn.wq.weight[0, 0] = -float("inf")
        elif where == "experts":
            assert model.layers[1].is_moe
            model.layers[1].moe.w_down[2, 3, 4] = float("inf")
        else:
            model.norm.weight[0] = float("nan")
    save_model_dir(model, tmp / "m")
    with pytest.raises(ValueError) as e:
        export_model_dir(tmp / "m", tmp / "m.mmoe")
    assert want in str(e.value)
    assert not (tmp / "m.mmoe").exists() and not list(tmp.glob(".m.mmoe*"))


def test_gguf_export_rejects_non_finite_weights(tiny_model_dir, capsys):
    from mobile.gguf_export import export_model_dir, main  # noqa: PLC0415
    from model.io import save_model_dir  # noqa: PLC0415

    model, tmp = tiny_model_dir
    with torch.no_grad():
        model.layers[2].moe.w_gate_up[0, 1, 2] = float("nan")
    save_model_dir(model, tmp / "m")
    for qtype in ("q4_0", "f16"):
        with pytest.raises(ValueError, match=r"^layers\.2\.moe\.w_gate_up: 1 non-finite value "):
            export_model_dir(tmp / "m", tmp / "m.gguf", qtype)
    # the CLI: one line naming the tensor, exit 2, no output file
    assert main(["--model", str(tmp / "m"), "--out", str(tmp / "m.gguf"), "--type", "q4_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layers.2.moe.w_gate_up: 1 non-finite value") and "\n" not in err
    assert not (tmp / "m.gguf").exists()
