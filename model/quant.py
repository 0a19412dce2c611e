"""The one INT4 / INT8 quantization format shared by QAT (train/) and the phone exporter (mobile/).

Weights (every linear matrix, experts and the tied embedding / LM head included):
  symmetric INT4, groups of GROUP=32 consecutive weights along the *input* (last) dimension,
  one fp16 scale per group:  s = fp16(amax(|w_group|) / 7),  q = clamp(round_half_even(w / s), -8, 7),
  w_hat = q * s (fp32).  An all-zero group gets s = 1 (q = 0).  4.5 bits per weight.
Activations (input of every quantized matmul):
  symmetric INT8 per token (per row over the whole input dimension), scale in fp32:
  a = amax(|x_row|) / 127, q = clamp(round_half_even(x / a), -127, 127), x_hat = q * a; a zero row gets a = 1.
The phone engine computes  y = a * sum_g s_g * sum_{i in g} q_x[i] * q_w[i]  with exact integer inner sums,
which equals x_hat @ w_hat^T up to fp32 summation order.  Router weights and norms stay fp32 (the router
is E x D, under 0.1% of the bytes, and top-k selection is sensitive to it; llama.cpp keeps it F32 too).
"""

from __future__ import annotations

import torch

from model.config import GROUP, int4_bytes  # noqa: F401  (re-exported: the format lives here)

QMIN, QMAX = -8, 7
ACT_QMAX = 127


def _check_groups(w: torch.Tensor, group: int) -> None:
    if w.shape[-1] % group != 0:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the quant group {group}")


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) float -> (q (..., K) int8 in [-8, 7], scales (..., K // group) fp16)."""
    _check_groups(w, group)
    wg = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    amax = wg.abs().amax(dim=-1)
    s16 = (amax / QMAX).to(torch.float16)
    s16 = torch.where(s16 == 0, torch.ones_like(s16), s16)
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
    xf = x.detach().float()
    a = xf.abs().amax(dim=-1) / ACT_QMAX
    a = torch.where(a == 0, torch.ones_like(a), a)
    q = torch.clamp(torch.round(xf / a.unsqueeze(-1)), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return q, a


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
