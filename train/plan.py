"""The recipe's plan (`python -m train --dry-run`) and the hardware check a real run makes before anything else.

print_plan: model, tokenizer, hardware, the expert-parallel layout (ep_lines), per stage its tokens, steps, LR
and the per-GPU memory estimate, then train/data_plan.py's per-source unique vs planned tokens.
check_hardware: CPU recipes run anywhere; a CUDA recipe fails at once, in one line, when the GPU memory is short.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model import cli
from model.config import count_params
from model.precision import policy_for
from train import data_plan
from train.loop import StageConfig, dist_info
from train.recipe_config import Recipe


class UsageError(cli.BadInput):
    """A bad command line or recipe: one line on stderr, exit 2."""


def memory_estimate(mcfg, st: StageConfig, gpus: int) -> dict:
    """Per-GPU bytes: FSDP2 shards fp32 weights + fp32 grads + AdamW m, v (16 B/param) over `gpus`; one block
    is gathered unsharded at a time (x2 for prefetch); activations of one micro-batch in bf16 without
    activation checkpointing (~34 B x tokens x d_model per layer, Korthikanti et al.) plus fp32 logits."""
    total, _ = count_params(mcfg)
    states = 16 * total / gpus
    per_layer = (total - mcfg.vocab_size * mcfg.d_model) / max(1, mcfg.n_layers)
    gathered = 2 * 4 * per_layer * 2
    tok = st.micro_batch * st.seq_len
    act = mcfg.n_layers * tok * mcfg.d_model * 34 + tok * mcfg.vocab_size * 4 * 3
    return dict(params=total, states=states, gathered=gathered, activations=act, total=states + gathered + act)


def _compute_itemsize(dev: str) -> int:
    """Bytes of one element of the token rows the all_to_all moves: the precision policy's compute dtype on the
    device the recipe will run on (bf16 on CUDA, fp32 on CPU; "auto" follows this machine, as the run does)."""
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return policy_for(dev).compute_dtype.itemsize


def ep_lines(rec: Recipe, mcfg) -> list[str]:
    """The device-mesh / expert-parallel layout for the planned world (the `[hardware]` gpus on CUDA; on CPU
    the world is whatever torchrun launches, so the mesh is given per world size)."""
    ep, gpus, dev, E = rec.hardware.ep, rec.hardware.gpus, rec.hardware.device, mcfg.n_experts
    if ep == 1:
        if E == 0:
            return ["expert parallel: off (ep = 1; a dense model has no routed experts)"]
        return [f"expert parallel: off (ep = 1: every rank holds all {E} routed experts, no all_to_all; "
                f"[hardware] ep = N shards them over N ranks)"]
    dp = f"{gpus // ep}" if dev != "cpu" else f"(world / {ep})"
    world = f"{gpus}" if dev != "cpu" else "world"
    L = E // ep
    return [f"expert parallel: ep {ep} (mesh dp_shard {dp} x ep {ep}, {L} experts per rank)",
            f"    ep rank r holds routed experts [{L}r, {L}r + {L}) of {E}; expert weights FSDP2 over dp_shard {dp}, "
            f"everything else over all {world} ranks"]


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def ep_stage_line(rec: Recipe, mcfg, st: StageConfig) -> str | None:
    """What the all_to_all moves in one optimizer step of `st` (None without EP). Per MoE layer and micro-batch
    a rank sends its tokens' top_k slot rows (compute dtype) + their fp32 gates to the experts' owners and gets
    as many output rows back; backward repeats both exchanges reversed. At balanced routing (ep - 1) / ep of
    the rows leave the rank. An estimate from the shapes, not a measurement."""
    ep, dev = rec.hardware.ep, rec.hardware.device
    if ep == 1 or mcfg.n_experts == 0:
        return None
    n_moe, K, D = mcfg.n_moe_layers, mcfg.top_k, mcfg.d_model
    tokens = st.global_batch * st.seq_len
    per_row = 2 * (2 * D * _compute_itemsize(dev) + 4)  # (x out + y back) rows + fp32 gate, forward and backward
    if dev != "cpu":
        gpus = rec.hardware.gpus
        rows = tokens * K // gpus
        sent = rows * per_row * n_moe * (ep - 1) / ep
        return (f"all_to_all (ep {ep}): {rows:,} slot rows per rank per MoE layer per step ({tokens // gpus:,} "
                f"tokens x top_k {K}) x {n_moe} layers, there and back, fwd + bwd: ~{_size(sent)} leave "
                f"each rank per step (balanced routing)")
    rows = tokens * K
    sent = rows * per_row * n_moe * (ep - 1) / ep
    return (f"all_to_all (ep {ep}): {rows:,} slot rows per MoE layer per step over all ranks ({tokens:,} tokens x "
            f"top_k {K}) x {n_moe} layers, there and back, fwd + bwd: ~{_size(sent)} cross ranks per step "
            f"(balanced routing)")


def print_plan(rec: Recipe, mcfg, stages: list[StageConfig], out: str) -> None:
    gpus, dev = rec.hardware.gpus, rec.hardware.device
    total, active = count_params(mcfg)
    print(f"plan: size {rec.size} ({rec.path}), run dir {out}")
    print(f"  model: {mcfg.name} d_model={mcfg.d_model} layers={mcfg.n_layers} experts={mcfg.n_experts} "
          f"top_k={mcfg.top_k} shared={mcfg.n_shared_experts} vocab={mcfg.vocab_size}; "
          f"{total / 1e6:.1f}M total / {active / 1e6:.1f}M active params")
    tk = rec.tokenizer
    print(f"  tokenizer: {tk.kind} " + (f"(train BPE {tk.vocab_size} on {tk.train_on})" if tk.kind == "bpe"
                                        else f"{tk.name or tk.file}"))
    print(f"  hardware: {dev}, planned GPUs {gpus} (FSDP2 across them)" if dev != "cpu" else f"  hardware: {dev}")
    for line in ep_lines(rec, mcfg):
        print(f"  {line}")
    print(f"  {'stage':<9} {'kind':<9} {'tokens':>16} {'seq':>6} {'batch':>6} {'steps':>10} {'lr':>8} "
          f"{'sched':<8} {'mem/GPU':>9}")
    for st in stages:
        mem = memory_estimate(mcfg, st, gpus)
        print(f"  {st.name:<9} {st.kind:<9} {st.tokens:>16,} {st.seq_len:>6} {st.global_batch:>6} {st.steps:>10,} "
              f"{st.lr:>8.1e} {st.schedule:<8} {mem['total'] / 2**30:>7.1f}Gi" + ("  (QAT)" if st.qat else ""))
        for line in data_plan.plan_lines(rec, st, Path(out)):  # unique vs planned tokens, epochs, warnings
            print(f"      {line}")
        a2a = ep_stage_line(rec, mcfg, st)
        if a2a is not None:
            print(f"      {a2a}")
    ev = rec.eval
    print(f"  eval: held-out {ev.heldout} (max {ev.max_tokens} tokens) vs its unigram entropy"
          + (f"; SFT pairs {ev.heldout_sft}" if ev.heldout_sft else ""))
    print(f"  outputs: {out}/<stage>/model, {out}/final (INT4 QAT), {out}/model.mmoe")


def check_hardware(rec: Recipe, mcfg, stages: list[StageConfig]) -> torch.device:
    """CPU recipes run anywhere; CUDA recipes fail at once, in one line, when the GPU memory is short;
    device = "auto" takes CUDA when there is one."""
    dev = rec.hardware.device
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    _, world = dist_info()
    need = max(memory_estimate(mcfg, st, world)["total"] for st in stages)
    if not torch.cuda.is_available():
        raise UsageError(f"size {rec.size} needs CUDA GPUs: about {need / 2**30:.1f} GiB per GPU with "
                         f"{world} GPU(s) (FSDP2); no CUDA device found (try --dry-run, or SIZE=tiny on CPU)")
    have = torch.cuda.get_device_properties(0).total_memory
    if have < need:
        raise UsageError(f"size {rec.size} needs about {need / 2**30:.1f} GiB per GPU with {world} GPU(s); "
                         f"this GPU has {have / 2**30:.1f} GiB (use more GPUs via torchrun)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
