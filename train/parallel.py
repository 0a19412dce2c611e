"""Process groups, device meshes and model sharding for a run.

init_distributed: the process group under torchrun (NCCL on GPUs, gloo on CPU). ep_meshes: with `[hardware] ep`
> 1 the (dp_shard x ep) mesh of model/expert_parallel.py plus the 1-D world mesh. wrap_fsdp / shard_model: FSDP2
per block + root under the precision policy. plain_copy: the full, unsharded weights for saving.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

from train.loop import dist_info


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the torchrun job (WORLD_SIZE > 1 and no process group yet) -> (rank, world, device)."""
    rank, world = dist_info()
    if world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist  # noqa: PLC0415

        # a stuck collective should fail within minutes, not hang for the default 30
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=int(os.environ.get("MMOE_DIST_TIMEOUT_MIN", 10))))
        rank, world = dist_info()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    return rank, world, device


def ep_meshes(ep: int, n_experts: int, device: torch.device, rank: int, world: int):
    """-> (ep_mesh, dp_mesh, world_mesh) for expert parallelism over groups of `ep` ranks, or three Nones when
    ep == 1. The caller has checked that ep divides the world size."""
    if ep == 1:
        return None, None, None
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    # experts: Shard(0) over ep, FSDP over dp_shard (same parent mesh); everything else FSDP over all ranks
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_shard", "ep"))
    world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    if rank == 0:
        print(f"expert parallel: mesh dp_shard {world // ep} x ep {ep}, {n_experts // ep} experts per rank",
              file=sys.stderr)
    return mesh["ep"], mesh["dp_shard"], world_mesh


def build_model(mcfg, device):
    from model.model import MobileMoE  # noqa: PLC0415

    return MobileMoE(mcfg).to(device)


def wrap_fsdp(model, policy=None):
    _, world = dist_info()
    if world == 1:
        return model
    return shard_model(model, policy)


def shard_model(model, policy=None):
    """FSDP2 per block + root under the precision policy (model/precision.py). Mixed precision: blocks are
    all-gathered in the compute dtype and reduce-scattered in the reduce dtype; each block's router and norm
    gains (and the final norm) form their own fp32 group, so the router reads fp32 weights as on one device."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    if policy is None or not policy.mixed:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    mp, fp32 = policy.fsdp_mp_policy(), policy.fsdp_fp32_policy()
    for layer in model.layers:
        keep = [layer.attn_norm, layer.ffn_norm] + ([layer.moe.router] if layer.is_moe else [])
        fully_shard(keep, mp_policy=fp32)
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.norm, mp_policy=fp32)
    fully_shard(model, mp_policy=mp)
    return model


def plain_copy(model, mcfg):
    """A plain (unsharded, CPU) model holding the full weights of a possibly FSDP-wrapped model.
    Collective under FSDP: every rank must call it; only rank 0's copy is complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415

    _, world = dist_info()
    if world == 1 and next(model.parameters()).device.type == "cpu":
        return model
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    m = MobileMoE(mcfg)
    if sd:
        m.load_state_dict(sd, strict=False)
    m.set_qat(bool(getattr(model, "qat", False)))
    return m
