"""Dropless routing: tokens-per-expert histogram, exclusive offsets, stable expert-order permutation + inverse.

Input: ids_TK (T, K) expert ids. Flatten to S = T*K token-slots, slot i = t*K + k.
Output (`Routing`):
  counts_E   (E,)   int32  slots routed to each expert (nothing is dropped, no capacity factor)
  offsets_E1 (E+1,) int32  exclusive prefix sum: expert e owns sorted rows [offsets[e], offsets[e+1])
  perm_S     (S,)   int32  sorted row -> slot; stable: within an expert, slots keep their original order
  inv_S      (S,)   int32  slot -> sorted row (inv[perm[s]] = s)

Triton path (deterministic, no atomics): four launches
  1. `_hist_kernel`    each program counts its BLOCK slots per expert -> counts_BE (NB blocks x E)
  2. `_scan_kernel`    the per-(block, expert) exclusive prefix over blocks, parallel over blocks: program
                       (c, g) owns blocks [c*CB, (c+1)*CB) x experts [g*BE, (g+1)*BE), scans its tile with
                       tl.cumsum along the blocks and adds the column sums of the c earlier chunks (a
                       reduction, no carried dependency between programs); the last chunk writes counts_E.
  3. `_offsets_kernel` one program, E lanes: offsets = exclusive cumsum of counts_E (E <= 128 values).
  4. `_scatter_kernel` each slot's row = offsets[e] + prefix[block, e] + rank among the same expert's
                       earlier slots in its block (a BLOCK x BLOCK compare), so the order is stable.

Sizes: BLOCK = 128 slots per hist / scatter program (the rank compare is 128 x 128 = 16K lanes, 128 per
thread at 4 warps, and a training micro-batch of 16K tokens x K = 8 gives NB = 1024 programs to fill the GPU).
CB = 128 blocks x BE = 16 experts per scan program: a 2K-int tile (16 registers per thread at 4 warps), each
row 64 contiguous bytes of counts_BE; at NB = 1024 and E = 96 that is 8 x 6 programs, the last reducing 7
earlier tiles, instead of one program walking 1024 blocks in series.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._triton_util import Launch, cdiv, next_pow2


@dataclass
class Routing:
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    perm_S: torch.Tensor
    inv_S: torch.Tensor


def _check_ids(ids_TK: torch.Tensor, n_experts: int) -> None:
    if ids_TK.dim() != 2:
        raise ValueError(f"ids_TK must be 2-D (T, K), got shape {tuple(ids_TK.shape)}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")


def routing_reference(ids_TK: torch.Tensor, n_experts: int) -> Routing:
    _check_ids(ids_TK, n_experts)
    flat_S = ids_TK.reshape(-1).long()
    counts_E = torch.bincount(flat_S, minlength=n_experts)
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.int64, device=ids_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    perm_S = torch.argsort(flat_S, stable=True)
    inv_S = torch.empty_like(perm_S)
    inv_S[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device)
    i32 = torch.int32
    return Routing(counts_E.to(i32), offsets_E1.to(i32), perm_S.to(i32), inv_S.to(i32))


# ----------------------------------------------------------------------------------------------- Triton
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a core dependency on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _hist_kernel(ids_ptr, counts_BE_ptr, S, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=E_PAD).to(tl.int32)  # pad -> matches no expert
        experts = tl.arange(0, E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        cnt = tl.sum(onehot, axis=0)
        tl.store(counts_BE_ptr + pid * E + experts, cnt, mask=experts < E)

    @triton.jit
    def _scan_kernel(counts_BE_ptr, prefix_BE_ptr, counts_E_ptr, NB, E, CB: tl.constexpr, BE: tl.constexpr):
        c = tl.program_id(0)
        ex = tl.program_id(1) * BE + tl.arange(0, BE)
        emask = ex < E
        blk = tl.arange(0, CB)
        carry = tl.zeros((BE,), dtype=tl.int32)
        for c0 in range(0, c):  # column sums of the earlier chunks
            b = c0 * CB + blk
            m = (b < NB)[:, None] & emask[None, :]
            carry += tl.sum(tl.load(counts_BE_ptr + b[:, None] * E + ex[None, :], mask=m, other=0), axis=0)
        b = c * CB + blk
        m = (b < NB)[:, None] & emask[None, :]
        cnt = tl.load(counts_BE_ptr + b[:, None] * E + ex[None, :], mask=m, other=0)
        incl = tl.cumsum(cnt, axis=0)
        tl.store(prefix_BE_ptr + b[:, None] * E + ex[None, :], incl - cnt + carry[None, :], mask=m)
        if c == tl.num_programs(0) - 1:
            tl.store(counts_E_ptr + ex, carry + tl.sum(cnt, axis=0), mask=emask)

    @triton.jit
    def _offsets_kernel(counts_E_ptr, offsets_ptr, E, E_PAD: tl.constexpr):
        experts = tl.arange(0, E_PAD)
        emask = experts < E
        cnt = tl.load(counts_E_ptr + experts, mask=emask, other=0)
        incl = tl.cumsum(cnt, axis=0)
        tl.store(offsets_ptr + 1 + experts, incl, mask=emask)
        tl.store(offsets_ptr + experts, incl - cnt, mask=experts == 0)

    @triton.jit
    def _scatter_kernel(ids_ptr, prefix_BE_ptr, offsets_ptr, perm_ptr, inv_ptr, S, E, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        local = tl.arange(0, BLOCK)
        offs = pid * BLOCK + local
        valid = offs < S
        ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
        # rank[i] = number of earlier slots j < i in this block with the same expert (stable order)
        same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        e = tl.where(valid, ids, 0)
        base = tl.load(offsets_ptr + e, mask=valid, other=0) + tl.load(prefix_BE_ptr + pid * E + e, mask=valid, other=0)
        pos = base + rank
        tl.store(perm_ptr + pos, offs, mask=valid)
        tl.store(inv_ptr + offs, pos, mask=valid)


ROUTING_BLOCK = 128  # slots per hist / scatter program (module docstring)
SCAN_CB, SCAN_BE = 128, 16  # blocks x experts per scan program


def plan_routing(ids_TK: torch.Tensor, n_experts: int, block: int | None = None, scan_chunk: int | None = None):
    """Allocate outputs and build the four launches. Returns (Routing, [Launch]).
    block / scan_chunk override BLOCK / CB (tests use small ones to get several blocks and chunks)."""
    _check_ids(ids_TK, n_experts)
    dev = ids_TK.device
    flat_S = ids_TK.reshape(-1)
    if not flat_S.is_contiguous():
        flat_S = flat_S.contiguous()
    S, E = flat_S.numel(), n_experts
    B = block or ROUTING_BLOCK
    CB = scan_chunk or SCAN_CB
    NB = max(1, cdiv(S, B))
    E_PAD = max(16, next_pow2(E))
    i32 = torch.int32
    counts_BE = torch.empty(NB, E, dtype=i32, device=dev)
    prefix_BE = torch.empty(NB, E, dtype=i32, device=dev)
    r = Routing(torch.empty(E, dtype=i32, device=dev), torch.empty(E + 1, dtype=i32, device=dev),
                torch.empty(S, dtype=i32, device=dev), torch.empty(S, dtype=i32, device=dev))
    warps = 4 if B <= 128 else 8
    launches = [
        Launch(_hist_kernel, (NB,), (flat_S, counts_BE, S, E), dict(BLOCK=B, E_PAD=E_PAD), num_warps=warps,
               label=f"routing histogram E={E}"),
        Launch(_scan_kernel, (cdiv(NB, CB), cdiv(E, SCAN_BE)), (counts_BE, prefix_BE, r.counts_E, NB, E),
               dict(CB=CB, BE=SCAN_BE), num_warps=4, label="routing block prefix"),
        Launch(_offsets_kernel, (1,), (r.counts_E, r.offsets_E1, E), dict(E_PAD=E_PAD), num_warps=4,
               label=f"routing offsets E={E}"),
        Launch(_scatter_kernel, (NB,), (flat_S, prefix_BE, r.offsets_E1, r.perm_S, r.inv_S, S, E), dict(BLOCK=B),
               num_warps=warps, label="routing scatter"),
    ]
    return r, launches


def routing_triton(ids_TK: torch.Tensor, n_experts: int, block: int | None = None,
                   scan_chunk: int | None = None) -> Routing:
    r, launches = plan_routing(ids_TK, n_experts, block, scan_chunk)
    if r.perm_S.numel() == 0:
        r.counts_E.zero_()
        r.offsets_E1.zero_()
        return r
    for launch in launches:
        launch.run()
    return r


def routing(ids_TK: torch.Tensor, n_experts: int, backend: str = "reference") -> Routing:
    if backend == "triton":
        return routing_triton(ids_TK, n_experts)
    return routing_reference(ids_TK, n_experts)
