"""The training loop: one stage = AdamW + an LR schedule over a deterministic batch stream, with gradient
accumulation, CE + weighted load-balance + z-loss, held-out evaluation, atomic resumable checkpoints
(sharded: each rank saves its own shards; resumable at another world size — train/ckpt.py), NaN/inf stop, wandb / jsonl logging, and FSDP2 when launched under torchrun.

Determinism: the global batch of step s is a pure function of (seed, s) (train/batches.py), so the data
position is the step; with fixed threads and deterministic algorithms on CPU a run killed and resumed from a
checkpoint repeats the uninterrupted run's per-step losses exactly.

Distributed: each rank builds only its own contiguous slice of the global batch's rows (the batch stream's
rank_batch: the same rows the global batch would have there) and the global count of loss targets. The loss each
rank back-propagates is normalised by the GLOBAL number of loss tokens (times world size, because FSDP2
averages gradients over ranks), so N ranks with the same global batch and micro-batch give the 1-rank
gradients up to float summation order.

Precision: one policy (model/precision.py) for training and evaluation, applied by the model itself
(bf16 matmul operands on CUDA with fp32 master weights, optimizer state, grad reduction and router; fp32 on
CPU). No torch.autocast: it does not reach the grouped GEMM's custom autograd Functions and would put the
router in bf16.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import flops_per_token
from model.precision import PrecisionPolicy, policy_for
from train import ckpt as ck
from train.batches import Batcher, LMSource, RankBatch, document_ids, eval_windows

log = logging.getLogger("mobilemoe.train")
IGNORE_INDEX = -100  # target id the fused loss skips: masked-out targets (SFT prompts, padding) get it
_ce_choice: dict[str, object] = {}  # device type -> the fused linear-CE function, or None for the plain path


def _liger_flce():
    """(liger_kernel's functional fused linear + cross-entropy, "") or (None, why not)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "not installed (pip install -e '.[fused-ce]')"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001  (a build broken against this torch/triton: train, but say why)
        return None, f"does not import ({type(e).__name__}: {e})"
    return liger_fused_linear_cross_entropy, ""


def ce_path(device: torch.device | str) -> str:
    """"fused" (liger_kernel's fused linear + cross-entropy: the (tokens, vocab) logits are never held, only
    chunks of them) on CUDA when liger_kernel imports, "plain" (F.linear + F.cross_entropy over the full
    logits) otherwise. Decided and logged once per device type."""
    device = torch.device(device)
    if device.type not in _ce_choice:
        if device.type == "cuda":
            fn, why = _liger_flce()
        else:  # Triton kernels: the fused loss needs a GPU (the tests run it under TRITON_INTERPRET=1)
            have = importlib.util.find_spec("liger_kernel") is not None
            fn, why = None, f"runs on CUDA only (liger_kernel {'installed' if have else 'not installed'})"
        _ce_choice[device.type] = fn
        if fn is not None:
            import importlib.metadata as md  # noqa: PLC0415

            log.info("loss: fused linear + cross-entropy (liger_kernel %s; logits in chunks, never whole; fp32 "
                     "weight-grad accumulation) on %s", md.version("liger-kernel"), device.type)
        else:
            log.info("loss: plain linear + cross-entropy (full logits) on %s; fused linear-CE %s -> plain path",
                     device.type, why)
    return "plain" if _ce_choice[device.type] is None else "fused"


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StageConfig:
    name: str = "pretrain"
    kind: str = "pretrain"  # pretrain | midtrain | sft | qat
    tokens: int = 1_000_000  # training tokens (global batch x seq_len x steps)
    seq_len: int = 128
    global_batch: int = 32  # sequences per optimizer step (all ranks, all micro-batches)
    micro_batch: int = 16  # sequences per forward on one rank
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine | constant | linear (warmup, then linear to min_lr)
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # wsd: the final fraction of steps decays linearly to min_lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    qat: bool = False
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 50
    log_every: int = 10
    data: list = field(default_factory=list)  # mixture: [{"source":..., "weight":...}, ...]

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for f in ("tokens", "seq_len", "global_batch", "micro_batch"):
            if getattr(self, f) <= 0:
                raise ValueError(f"stage {self.name}: {f} must be > 0")
        if self.schedule not in ("wsd", "cosine", "constant", "linear"):
            raise ValueError(f"stage {self.name}: unknown schedule {self.schedule!r} (wsd|cosine|constant|linear)")
        if self.kind not in ("pretrain", "midtrain", "sft", "qat"):
            raise ValueError(f"stage {self.name}: unknown kind {self.kind!r} (pretrain|midtrain|sft|qat)")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.global_batch * self.seq_len))


def lr_at(step: int, cfg: StageConfig) -> float:
    """LR for optimizer step `step` (0-based) of cfg.steps."""
    n = cfg.steps
    warm = int(round(cfg.warmup_frac * n))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        dec = max(1, int(round(cfg.decay_frac * n)))
        start = n - dec
        if step < start:
            return cfg.lr
        frac = (step - start + 1) / dec
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    frac = (step - warm + 1) / max(1, n - warm)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))  # cosine


# ------------------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def make_optimizer(model, cfg: StageConfig) -> torch.optim.Optimizer:
    # decay matrices (2-D+), not norm gains; the expert tensors (3-D) are matrices too
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=other, weight_decay=0.0)],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def _model_cfg(model):
    return getattr(model, "cfg", None) or model.module.cfg


def _inner(model):
    return model if hasattr(model, "set_precision") else getattr(model, "module", model)


def apply_precision(model, device, precision: PrecisionPolicy | None = None) -> PrecisionPolicy | None:
    """Set `precision` (default: policy_for(device)) on the model; returns the policy it had before."""
    m = _inner(model)
    if not hasattr(m, "set_precision"):
        return None
    before = m.precision
    m.set_precision(precision or policy_for(device))
    return before


def forward_loss(model, ids_BT1: torch.Tensor, mask_BT: torch.Tensor, device,
                 doc_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked CE over targets, number of loss tokens) for one micro-batch (mask_BT: 0/1 per target).
    Both paths take the LM head's operands in the model's precision policy (bf16 on CUDA) and compute the CE
    in fp32; the router's aux terms are in model.aux either way. doc_BT: the input tokens' document ids for
    document masking (model.MobileMoE.forward), None: plain causal attention."""
    inp, tgt_BT = ids_BT1[:, :-1].to(device), ids_BT1[:, 1:].to(device)
    m_N = mask_BT.to(device).reshape(-1).float()
    kw = {} if doc_BT is None else dict(doc_ids_BT=doc_BT.to(device))
    if ce_path(device) == "fused":
        h_BTD = model(inp, return_hidden=True, **kw)
        # read after the forward: under FSDP2 the root (which holds the head / tied embedding) stays unsharded
        # after its forward, so this is the gathered weight whose grad the root's post-backward reduces
        x_BTD, w_VD = _inner(model).head_operands(h_BTD)
        tgt_N = torch.where(m_N != 0, tgt_BT.reshape(-1), IGNORE_INDEX)
        s = _ce_choice[torch.device(device).type](x_BTD.reshape(-1, x_BTD.shape[-1]), w_VD, tgt_N,
                                                  ignore_index=IGNORE_INDEX, reduction="sum",
                                                  accum_dtype=torch.float32)
        return s, m_N.sum()
    logits = model(inp, **kw)  # matmuls in the model's precision policy (apply_precision); CE in fp32
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt_BT.reshape(-1), reduction="none")
    return (ce * m_N).sum(), m_N.sum()


@torch.no_grad()
def evaluate(model, ids_BT1: torch.Tensor, mask_BT: torch.Tensor, micro_batch: int, device,
             precision: PrecisionPolicy | None = None, doc_eos: int | None = None) -> float:
    """Mean masked CE (nats/token) over the given rows. Every rank evaluates all rows (FSDP needs all ranks).
    Runs under `precision`, else the model's current policy, else policy_for(device) (training's policy);
    the model's policy is restored afterwards. doc_eos: document masking at that EOS id (as a doc_mask run
    trains), None: plain causal attention over each row."""
    device = torch.device(device)
    m = _inner(model)
    prev = getattr(m, "precision", None)
    before = apply_precision(model, device, precision or prev)
    was = model.training
    model.eval()
    tot, n = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i in range(0, ids_BT1.shape[0], micro_batch):
        x = ids_BT1[i:i + micro_batch]
        doc = None if doc_eos is None else document_ids(x[:, :-1], doc_eos)
        s, c = forward_loss(model, x, mask_BT[i:i + micro_batch], device, doc)
        tot += s.double().cpu()
        n += c.double().cpu()
    model.train(was)
    if hasattr(m, "set_precision"):
        m.set_precision(before)
    return float(tot / n.clamp_min(1))


def unigram_entropy(ids_BT1: torch.Tensor, mask_BT: torch.Tensor, vocab: int) -> float:
    """Entropy (nats) of the empirical unigram distribution of the held-out target tokens themselves."""
    tgt = ids_BT1[:, 1:][mask_BT.bool()]
    c = torch.bincount(tgt.reshape(-1), minlength=vocab).double()
    p = c[c > 0] / c.sum()
    return float(-(p * p.log()).sum())


def peak_flops(device: torch.device) -> float:
    """Nominal peak for the MFU estimate: bf16 dense tensor-core peak on known GPUs; on CPU, cores x 3 GHz x
    32 fp32 FLOPs/cycle (2 AVX2 FMA units). An estimate for trends, not a benchmark."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
            if k in name:
                return v
        return 100e12
    return (os.cpu_count() or 1) * 3e9 * 32


def rank_batch(batcher, step: int, rank: int, world: int) -> RankBatch:
    """This rank's rows of step `step`: the stream's own rank_batch (Batcher, StoreMixture), else the rows of a
    plain get() -> (ids, mask) global batch."""
    if hasattr(batcher, "rank_batch"):
        return batcher.rank_batch(step, rank, world)
    ids_all, mask_all = batcher.get(step)
    per = ids_all.shape[0] // world
    return RankBatch(ids_all[rank * per:(rank + 1) * per], mask_all[rank * per:(rank + 1) * per],
                     int(mask_all.sum()))


# ------------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    heldout_loss: float | None = None
    extra: dict = field(default_factory=dict)


def train_stage(model, cfg: StageConfig, batcher: Batcher, *, stage_dir: str | os.PathLike | None = None,
                eval_fn=None, tracker=None, resume: str | os.PathLike | None = "auto", fingerprint: str = "",
                tokenizer_json=None, progress: bool = True, device: torch.device | str = "cpu",
                seed: int = 0, max_steps: int | None = None, precision: PrecisionPolicy | None = None) -> StageResult:
    """Train `model` (already wrapped / QAT-switched by the caller) for cfg.steps optimizer steps.

    stage_dir: checkpoints + log.jsonl go here (None: no checkpoints, no log file).
    resume: "auto" = latest checkpoint in stage_dir if any; a path = that checkpoint; None = start fresh.
    eval_fn(model) -> dict of held-out metrics ("heldout_loss" first), called every cfg.eval_every and at the end.
    max_steps: stop early after this many steps of this process (tests use it to simulate a crash point).
    precision: the precision policy (default policy_for(device)); set on the model and left there, so eval_fn
    and the caller's later evaluations use the same one.
    """
    device = torch.device(device)
    apply_precision(model, device, precision)
    rank, world = dist_info()
    mcfg = _model_cfg(model)
    mcfg.lb_loss_weight, mcfg.z_loss_weight = cfg.lb_loss_weight, cfg.z_loss_weight
    if cfg.global_batch % (cfg.micro_batch * world) != 0:
        raise ValueError(f"stage {cfg.name}: global_batch {cfg.global_batch} is not a multiple of "
                         f"micro_batch {cfg.micro_batch} x world size {world}")
    n_micro_global = cfg.global_batch // cfg.micro_batch
    rows_per_rank = cfg.global_batch // world
    optim = make_optimizer(model, cfg)
    start = 0
    sdir = Path(stage_dir) if stage_dir is not None else None
    log_path = sdir / "log.jsonl" if sdir is not None else None
    path = None
    if resume == "auto" and sdir is not None:
        path = ck.latest_checkpoint(sdir)
    elif resume not in (None, "auto"):
        path = Path(resume)
    if path is not None:
        st = ck.restore_checkpoint(path, model, optim, fingerprint or None)  # either layout, any world size
        start = int(st["step"])
        if rank == 0:
            print(f"[{cfg.name}] resumed from {path} at step {start}", file=sys.stderr)
        if sdir is not None:  # later checkpoints of this stage are another trajectory's: out of the way
            moved = ck.set_aside_after(sdir, start)
            if moved and rank == 0:
                print(f"[{cfg.name}] {len(moved)} later checkpoint(s) of the abandoned run moved to "
                      f"{moved[0].parent}", file=sys.stderr)
    if log_path is not None and rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if log_path.exists() and start > 0:  # drop records of steps after the checkpoint (they will be redone)
            kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) < start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    steps = cfg.steps
    tok_per_step = cfg.global_batch * cfg.seq_len
    ftok = 3 * flops_per_token(mcfg, cfg.seq_len)  # fwd + bwd
    peak = peak_flops(device) * world
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=steps, initial=start, desc=f"{cfg.name:>9}", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    model.train()
    t0 = time.time()
    last_good = path
    done_here = 0
    recent: list[float] = []
    for step in range(start, steps):
        if max_steps is not None and done_here >= max_steps:
            break
        ts = time.time()
        lr = lr_at(step, cfg)
        for g in optim.param_groups:
            g["lr"] = lr
        rb = rank_batch(batcher, step, rank, world)  # this rank's rows only, and the global target count
        if rb.ids.shape[0] != rows_per_rank:
            raise ValueError(f"stage {cfg.name}: the batch stream gave rank {rank} {rb.ids.shape[0]} rows, "
                             f"want {rows_per_rank}")
        if step == start and rank == 0 and rb.doc is not None:
            log.info("document masking on: attention within documents, RoPE positions restart at each one")
        n_tok_global = torch.tensor(max(rb.n_targets, 1), dtype=torch.float32)
        ids, mask, doc = rb.ids, rb.mask, rb.doc
        ce_sum = torch.zeros((), dtype=torch.float64)
        aux_sum = torch.zeros((), dtype=torch.float64)
        counts = None
        ent = torch.zeros((), dtype=torch.float64)
        for i in range(0, rows_per_rank, cfg.micro_batch):
            s, _ = forward_loss(model, ids[i:i + cfg.micro_batch], mask[i:i + cfg.micro_batch], device,
                                None if doc is None else doc[i:i + cfg.micro_batch])
            aux = model.aux_loss() if hasattr(model, "aux_loss") else torch.zeros((), device=device)
            loss = (s / n_tok_global.to(device) + aux / n_micro_global) * world
            loss.backward()
            ce_sum += s.detach().double().cpu()
            aux_sum += aux.detach().double().cpu()
            ec = model.aux.get("expert_counts")
            if ec is not None:
                counts = ec.detach().double().cpu() if counts is None else counts + ec.detach().double().cpu()
                ent += model.aux["router_entropy"].detach().double().cpu()
        clip = torch.nn.utils.clip_grad_norm_
        if any(getattr(m, "ep_group", None) is not None for m in model.modules()):
            from model.expert_parallel import clip_grad_norm_ as clip  # noqa: PLC0415  (grads on two meshes)
        gn = clip(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        stats = torch.stack([ce_sum, aux_sum, ent])
        stats = _all_sum(stats)
        ce = float(stats[0] / n_tok_global.double())
        aux_mean = float(stats[1] / n_micro_global)
        loss_val = ce + aux_mean
        if not math.isfinite(loss_val) or not math.isfinite(float(gn)):
            optim.zero_grad(set_to_none=True)
            if bar is not None:
                bar.close()
            raise TrainingDiverged(f"stage {cfg.name}: non-finite loss ({loss_val}) or grad norm ({float(gn)}) at "
                                   f"step {step}; last good checkpoint: {last_good or 'none'}")
        optim.step()
        optim.zero_grad(set_to_none=True)
        if hasattr(model, "update_router_bias"):
            if world > 1:
                for m in model.modules():
                    if hasattr(m, "load_accum"):
                        dist.all_reduce(m.load_accum)
            model.update_router_bias()
        dt = time.time() - ts
        if counts is not None:
            counts = _all_sum(counts)
        rec = dict(step=step, loss=loss_val, ce=ce, aux=aux_mean, lr=lr, grad_norm=float(gn),
                   tokens_per_s=tok_per_step / max(dt, 1e-9), mfu=ftok * tok_per_step / max(dt, 1e-9) / peak)
        if counts is not None:
            frac = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            rec["router_entropy"] = float(stats[2] / n_micro_global)
            rec["expert_load"] = [[round(float(v), 5) for v in row] for row in frac]
        recent.append(ce)
        done_here += 1
        if log_path is not None and rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if tracker is not None and rank == 0 and (step % cfg.log_every == 0 or step == steps - 1):
            tracker.log_step(rec, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.3f}", lr=f"{lr:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        is_last = step == steps - 1
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not is_last:
            ev = eval_fn(model)
            if rank == 0:
                msg = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
                (bar.write if bar is not None else print)(f"[{cfg.name}] step {step + 1}: {msg}")
            if tracker is not None and rank == 0:
                tracker.log_eval(ev, step)
        if sdir is not None and ((step + 1) % cfg.ckpt_every == 0 or is_last):
            # every rank writes its own shards: no full model / optimizer state is gathered anywhere
            st = dict(stage=cfg.name, fingerprint=fingerprint, data_position=step + 1, schedule_step=step + 1)
            last_good = ck.save_sharded_checkpoint(sdir, step + 1, model, optim, st, tokenizer_json)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    res = StageResult(name=cfg.name, steps=steps, tokens=steps * tok_per_step, seconds=seconds,
                      train_loss=float(sum(recent[-10:]) / max(1, len(recent[-10:]))) if recent else float("nan"))
    if eval_fn is not None and (max_steps is None or start + done_here >= steps):
        ev = eval_fn(model)
        res.heldout_loss = ev.get("heldout_loss")
        res.extra.update(ev)
        if tracker is not None and rank == 0:
            tracker.log_eval(ev, steps - 1)
    return res


# ------------------------------------------------------------------------------------------------------
def quick_pretrain(model, train_ids_1d: torch.Tensor, val_ids_1d: torch.Tensor, *, tokens: int, seq_len: int,
                   batch_size: int, lr: float, seed: int = 0, progress: bool = False) -> dict:
    """Minimal functional pre-train for sweeps: AdamW (0.9, 0.95, wd 0.1, clip 1.0), WSD schedule (5% warmup,
    20% linear decay to lr/10), CE + the model's aux loss; no checkpoints, no logging.
    val_loss = mean CE over non-overlapping seq_len windows of val_ids_1d (all of it)."""
    if train_ids_1d.numel() < seq_len + 2:
        raise ValueError(f"train_ids_1d has {train_ids_1d.numel()} tokens; need more than seq_len+1={seq_len + 1}")
    if val_ids_1d.numel() < seq_len + 1:
        raise ValueError(f"val_ids_1d has {val_ids_1d.numel()} tokens; need at least seq_len+1={seq_len + 1}")
    device = next(model.parameters()).device
    cfg = StageConfig(name="quick", kind="pretrain", tokens=tokens, seq_len=seq_len, global_batch=batch_size,
                      micro_batch=batch_size, lr=lr, min_lr=lr / 10, schedule="wsd", ckpt_every=10**9)
    batcher = Batcher([LMSource(train_ids_1d.long().cpu())], [1.0], seq_len, batch_size, seed)
    vx, vm = eval_windows(val_ids_1d.long().cpu(), seq_len)
    torch.manual_seed(seed)
    res = train_stage(model, cfg, batcher, stage_dir=None, resume=None, progress=progress, device=device,
                      seed=seed)
    val = evaluate(model, vx, vm, max(1, batch_size), device)
    return dict(val_loss=val, train_loss=res.train_loss, tokens=res.tokens, seconds=res.seconds)


def stage_config_from_dict(d: dict) -> StageConfig:
    known = set(StageConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"stage {d.get('name', '?')}: unknown key(s) {unknown}")
    return StageConfig(**d)


def stage_dict(cfg: StageConfig) -> dict:
    d = asdict(cfg)
    d["betas"] = list(cfg.betas)
    return d
