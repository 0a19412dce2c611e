"""Expert parallelism: the routed experts sharded over an `ep` process group, tokens exchanged by all_to_all.

With an EP group of P ranks and E routed experts (E % P == 0), rank r owns the E/P consecutive experts
[r E/P, (r+1) E/P). Every rank routes its own tokens with the replicated router, then (expert_parallel_experts):

    counts        per (destination rank, local expert) slot counts, (P, E/P) -> all_to_all -> what each source
                  rank will send to this rank's experts (host-side split sizes)
    dispatch      the token rows, sorted by global expert id (so grouped by destination rank, then expert),
                  and their fp32 gates -> all_to_all_single; the received rows' local expert ids follow from
                  the received counts (no third exchange)
    compute       kernels.moe.moe_experts on the received rows with K = 1 and the local experts' weights
                  (reference on CPU, Triton on CUDA); gates applied on the F side exactly as on one device
    combine       the outputs -> reverse all_to_all_single -> back to slot order -> sum over the K slots

Every exchange is `_AllToAll`, an autograd.Function whose backward is the reverse exchange (splits swapped),
so autograd is correct in both directions; zero-length splits (a rank sending or receiving nothing, an expert
receiving nothing) are ordinary empty slices. The backward exchanges are collectives: every rank must run its
backward through the same MoE layers, which holds because each rank's graph always contains every exchange
(a rank that received no rows still returns a (0, D) output connected to the received tensors and to its
expert weights, which get an exact zero gradient so FSDP reduce-scatters the same parameters everywhere).

Gradient scale. The expert weights on rank r see the tokens of all P ranks of its EP group; their gradient is
scaled by 1/P on the way back, so it is the gradient of the *mean* of the P ranks' losses, the same quantity a
data-parallel average gives the replicated (non-expert) parameters. Two ways to finish the reduction:
  * no FSDP: all-reduce (average) the replicated parameters' gradients over the EP group
    (`allreduce_replicated_grads`); the expert gradients are already complete;
  * FSDP2 on a (dp_shard x ep) mesh: the expert weights fully_shard over the `dp_shard` sub-mesh, everything
    else (router, shared expert, attention, norms, embeddings) over all dp_shard * ep ranks
    (`shard_model_ep`): FSDP's averaging then gives every parameter the gradient of the global mean loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from kernels.moe import moe_experts


class _AllToAll(torch.autograd.Function):
    """out = all_to_all_single(x) with per-rank row splits; backward = the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, dout):
        return _exchange(dout, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x, out_splits: list[int], in_splits: list[int], group):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _Permute(torch.autograd.Function):
    """x[perm] for a permutation perm of the rows, with backward dout[inv]: a gather both ways (deterministic,
    no scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, dout):
        (inv,) = ctx.saved_tensors
        return dout.index_select(0, inv), None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def expert_parallel_experts(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                            w_gate_up_LFD: torch.Tensor, w_down_LDF: torch.Tensor, group,
                            backend: str = "auto", act_fq: Callable | None = None) -> torch.Tensor:
    """The routed experts of this rank's tokens, computed by the ranks of `group` that own them.

    x_TD (T, D) this rank's tokens (compute dtype); ids_TK global expert ids in [0, E); gates_TK (T, K) fp32;
    w_gate_up_LFD (L, 2F, D), w_down_LDF (L, D, F): this rank's L = E / P experts (global ids r L .. r L + L-1).
    -> y_TD (T, D), equal to kernels.moe.moe_experts with the full (E, ...) weights. Collective over `group`:
    every rank calls it for the same layer in the same order."""
    P = dist.get_world_size(group)
    L = w_gate_up_LFD.shape[0]
    T, K = ids_TK.shape
    S, D_out = T * K, w_down_LDF.shape[1]
    dev = x_TD.device
    flat_S = ids_TK.reshape(S)
    order_S = torch.argsort(flat_S, stable=True)  # by global expert: grouped by destination rank, then expert
    inv_S = torch.empty_like(order_S)
    inv_S[order_S] = torch.arange(S, device=dev)
    send_PL = torch.bincount(flat_S, minlength=P * L).view(P, L)
    recv_PL = torch.empty_like(send_PL)
    dist.all_to_all_single(recv_PL, send_PL, group=group)  # row j: what rank j sends to each of my experts
    counts = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # one host sync for all the split sizes
    in_splits, out_splits = counts[0], counts[1]
    # slot s holds token s // K: expanding to slots first makes the backward a fixed-order sum over K
    x_SD = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[1]).reshape(S, x_TD.shape[1])
    x_send = _Permute.apply(x_SD, order_S, inv_S)
    g_send = _Permute.apply(gates_TK.reshape(S, 1), order_S, inv_S)
    x_recv_RD = all_to_all(x_send, out_splits, in_splits, group)
    g_recv_R1 = all_to_all(g_send, out_splits, in_splits, group)
    R = x_recv_RD.shape[0]
    ids_R1 = torch.repeat_interleave(torch.arange(L, device=dev).repeat(P), recv_PL.reshape(-1)).view(R, 1)
    # the expert weights here serve all P ranks' tokens: 1/P turns their summed gradient into the mean's
    w13 = _ScaleGrad.apply(w_gate_up_LFD, 1.0 / P)
    w2 = _ScaleGrad.apply(w_down_LDF, 1.0 / P)
    if R:
        y_recv_RD = moe_experts(x_recv_RD, ids_R1, g_recv_R1, w13, w2, backend=backend, act_fq=act_fq)
    else:
        # nothing to compute, but the backward exchanges must still run here (they are collectives) and the
        # expert weights get an exact zero gradient: keep the empty output connected to all of them
        y_recv_RD = (x_recv_RD[:, :1] * g_recv_R1.to(x_recv_RD.dtype)).expand(0, D_out) \
            + (w13.sum() + w2.sum()).to(x_recv_RD.dtype) * 0
    y_send = all_to_all(y_recv_RD, in_splits, out_splits, group)  # back to the sender, in its sorted order
    y_SD = _Permute.apply(y_send, inv_S, order_S)  # slot order
    return y_SD.view(T, K, D_out).sum(dim=1)


def local_expert_range(n_experts: int, group) -> tuple[int, int]:
    """[start, stop) of the experts this rank owns in `group`."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if n_experts % P:
        raise ValueError(f"expert parallelism: {n_experts} experts are not divisible by the EP group size {P}")
    L = n_experts // P
    return r * L, (r + 1) * L


def as_ep_mesh(ep, device_type: str):
    """A 1-D DeviceMesh for `ep` (a DeviceMesh, returned as is, or a ProcessGroup)."""
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415

    if isinstance(ep, DeviceMesh):
        if ep.ndim != 1:
            raise ValueError(f"expert parallelism: the ep mesh must be 1-D, got {ep.ndim}-D (pass mesh['ep'])")
        return ep
    return DeviceMesh.from_group(ep, device_type)


def shard_experts(w_E: torch.Tensor, mesh):
    """The (E, ...) expert tensor as a DTensor sharded on dim 0 over the 1-D `mesh`, from this rank's slice
    (every rank holds the same full tensor here, so no data moves). Global shapes stay (E, ...): DCP checkpoints
    and full state dicts see whole experts, and FSDP2 over a dp_shard mesh with the same parent composes with it
    (a 2-D DTensor, dp_shard x ep)."""
    from torch.distributed.tensor import DTensor, Shard  # noqa: PLC0415

    a, b = local_expert_range(w_E.shape[0], mesh.get_group())
    return DTensor.from_local(w_E[a:b].detach().clone(), mesh, [Shard(0)], run_check=False)


def is_expert_param(name: str) -> bool:
    """A routed-expert weight (sharded over ep); every other parameter is replicated across the EP group."""
    return name.endswith("moe.w_gate_up") or name.endswith("moe.w_down")


@torch.no_grad()
def allreduce_replicated_grads(model: torch.nn.Module, group) -> None:
    """Average the gradients of every non-expert parameter over the EP group (use without FSDP; with
    shard_model_ep FSDP does it). Expert gradients are left as they are: already the EP group's mean."""
    P = dist.get_world_size(group)
    for name, p in model.named_parameters():
        if p.grad is not None and not is_expert_param(name):
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(P)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for an expert-parallel model, whose gradients mix plain tensors and
    DTensors on several meshes (the builtin refuses both mixes). Plain gradients count once (replicated after
    allreduce_replicated_grads, or one process); a sharded DTensor's local pieces are disjoint across its mesh,
    so their squared norms are summed over every dim of that mesh. -> the total norm (before clipping); the
    gradients are scaled by min(1, max_norm / (norm + 1e-6)), as the builtin does."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dev = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    plain = torch.zeros((), dtype=torch.float64, device=dev)
    by_mesh: dict = {}  # first-seen order: the same on every rank (same parameter order)
    for g in grads:
        if isinstance(g, DTensor):
            if any(pl.is_replicate() or pl.is_partial() for pl in g.placements):  # Shard / _StridedShard only
                raise ValueError(f"clip_grad_norm_: a gradient with placements {g.placements} (only sharded "
                                 f"DTensors and plain tensors are summed correctly)")
            sq = by_mesh.setdefault(g.device_mesh, torch.zeros((), dtype=torch.float64, device=dev))
            sq += g.to_local().double().pow(2).sum()
        else:
            plain += g.double().pow(2).sum()
    total = plain
    for mesh, sq in by_mesh.items():
        for d in range(mesh.ndim):
            dist.all_reduce(sq, group=mesh.get_group(d))
        total = total + sq
    norm = total.sqrt().float()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def shard_model_ep(model, world_mesh, dp_mesh, policy=None):
    """FSDP2 for an expert-parallel model (after model.set_expert_parallel(mesh["ep"])): each MoE's expert
    weights fully_shard over `dp_mesh` = mesh["dp_shard"] (the ranks holding the same experts; it must come from
    the same 2-D mesh as the ep mesh), everything else over `world_mesh` (all dp_shard * ep ranks, 1-D). Mixed precision as train/parallel.py's shard_model: blocks gathered in the compute
    dtype, router and norm gains in their own fp32 groups."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mixed = policy is not None and policy.mixed
    mp = {"mp_policy": policy.fsdp_mp_policy()} if mixed else {}
    fp32 = {"mp_policy": policy.fsdp_fp32_policy()} if mixed else {}
    for layer in model.layers:
        if mixed:
            fully_shard([layer.attn_norm, layer.ffn_norm], mesh=world_mesh, **fp32)
        if layer.is_moe:
            moe = layer.moe
            fully_shard(moe.router, mesh=world_mesh, **(fp32 if mixed else {}))
            if moe.shared is not None:
                fully_shard(moe.shared, mesh=world_mesh, **mp)
            fully_shard(moe, mesh=dp_mesh, **mp)  # what is left in the MoE: w_gate_up, w_down
        fully_shard(layer, mesh=world_mesh, **mp)
    if mixed:
        fully_shard(model.norm, mesh=world_mesh, **fp32)
    fully_shard(model, mesh=world_mesh, **mp)
    return model
