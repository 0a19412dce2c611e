"""The one INT4 / INT8 quantization format shared by QAT (train/) and the phone exporter (mobile/).

Weights (every linear matrix, experts and the tied embedding / LM head included):
  symmetric INT4, groups of GROUP=32 consecutive weights along the *input* (last) dimension,
  one fp16 scale per group:
    s = clamp(fp16(amax(|w_group|) / 7), 2^-14, 65504)     (fp32 division, round to nearest even, then clamp)
    q = clamp(round_half_even(w / s), -8, 7)                (fp32 division)
    w_hat = q * s (fp32).  4.5 bits per weight.
  The clamp keeps every scale a positive *normal* fp16 number: an all-zero group gets s = 2^-14 (q = 0); a tiny
  group whose amax / 7 would be an fp16 subnormal or 0 gets s = 2^-14, so its weights of magnitude <= 2^-15
  quantize to 0 and every weight is off by at most 2^-15; a huge group (amax / 7 > 65504, which fp16 would
  round to 65504 or inf) gets s = 65504 and its codes saturate at -8 / 7.  Non-finite weights have no INT4
  value: the exporters reject them by tensor name (check_finite); in QAT a NaN weight gives a NaN scale and a
  NaN forward, which the loss shows (an inf weight is a huge group).
Activations (input of every quantized matmul):
  symmetric INT8 per token (per row over the whole input dimension), scale in fp32:
    amax = max |x_i| over the row, NaN elements skipped (an inf counts)
    a = clamp(amax / 127, 2^-126, FLT_MAX)                  (fp32 division; 2^-126 = the smallest normal fp32)
    q = clamp(round_half_even(x / a), -127, 127), NaN -> 0;  x_hat = q * a.
  So a zero (or all-NaN) row gets a = 2^-126 and q = 0, a row of subnormals quantizes with a = 2^-126 too, and a
  row holding an inf gets a = FLT_MAX (the inf -> +-127, a finite x -> round(x / FLT_MAX): 0 unless |x| >=
  FLT_MAX / 2).  A NaN activation thus reads as 0 in the QAT forward, as in the engine; the fp32 residual stream
  keeps the NaN.  The C engine's quantizers (mobile/c/kernels_scalar.c and its SIMD twins) follow this rule byte
  for byte, in IEEE fp32 without flush-to-zero on both sides.
The phone engine computes  y = a * sum_g s_g * sum_{i in g} q_x[i] * q_w[i]  with exact integer inner sums,
which equals x_hat @ w_hat^T up to fp32 summation order.  Router weights and norms stay fp32 (the router
is E x D, under 0.1% of the bytes, and top-k selection is sensitive to it; llama.cpp keeps it F32 too).
"""

from __future__ import annotations

import torch

from model.config import GROUP, int4_bytes  # noqa: F401  (re-exported: the format lives here)

QMIN, QMAX = -8, 7
ACT_QMAX = 127
# Scale bounds (see the module docstring): the smallest normal / largest finite fp16, and the smallest normal /
# largest finite fp32. Subnormal scales are excluded because they carry fewer mantissa bits (w_hat = q * s drifts
# far from w) and flush-to-zero floating-point modes would turn them into 0.
S_MIN, S_MAX = 2.0**-14, 65504.0
ACT_S_MIN, ACT_S_MAX = 2.0**-126, float(torch.finfo(torch.float32).max)


def _check_groups(w: torch.Tensor, group: int) -> None:
    if w.shape[-1] % group != 0:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the quant group {group}")


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) float -> (q (..., K) int8 in [-8, 7], scales (..., K // group) fp16)."""
    _check_groups(w, group)
    wg = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    amax = wg.abs().amax(dim=-1)
    s16 = (amax / QMAX).to(torch.float16).clamp(S_MIN, S_MAX)
    q = torch.clamp(torch.round(wg / s16.float().unsqueeze(-1)), QMIN, QMAX).to(torch.int8)
    return q.reshape(w.shape), s16


def dequantize_int4(q: torch.Tensor, s16: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    qg = q.float().reshape(*q.shape[:-1], q.shape[-1] // group, group)
    return (qg * s16.float().unsqueeze(-1)).reshape(q.shape)


class _STE(torch.autograd.Function):
    """Forward the quantized value, pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, x_hat):  # noqa: D401
        return x_hat

    @staticmethod
    def backward(ctx, g):
        return g, None


def fake_quant_int4(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    q, s = quantize_int4(w, group)
    return _STE.apply(w, dequantize_int4(q, s, group).to(w.dtype))


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) int8 in [-127, 127], scale (...,) fp32)."""
    # a NaN element counts as 0: skipped by amax, code 0 (the C quantizers' rule); +-inf stay
    xf = x.detach().float().nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    a = (xf.abs().amax(dim=-1) / ACT_QMAX).clamp(ACT_S_MIN, ACT_S_MAX)
    q = torch.clamp(torch.round(xf / a.unsqueeze(-1)), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return q, a


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError("NAME: N non-finite values") when t holds NaN or inf (exporters call it per tensor)."""
    bad = int((~torch.isfinite(t.detach())).sum())
    if bad:
        raise ValueError(f"{name}: {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf); "
                         "the weights cannot be quantized")


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    q, a = quantize_act_int8(x)
    return _STE.apply(x, (q.float() * a.unsqueeze(-1)).to(x.dtype))


def pack_int4(q: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """q (..., K) int8 in [-8, 7] -> uint8 (..., K // 2).

    Within each group of 32, byte i (0..15) holds (q[i] + 8) in its low nibble and (q[i + 16] + 8) in its
    high nibble: one 16-byte SIMD load yields elements 0-15 (low) and 16-31 (high), as in ggml's Q4_0.
    """
    _check_groups(q, group)
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // group, group)
    half = group // 2
    packed = u[..., :half] | (u[..., half:] << 4)
    return packed.reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    half = group // 2
    p = packed.reshape(*packed.shape[:-1], packed.shape[-1] // half, half)
    lo = (p & 0x0F).to(torch.int16) - 8
    hi = (p >> 4).to(torch.int16) - 8
    return torch.cat([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)
