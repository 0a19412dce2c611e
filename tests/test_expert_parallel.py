"""Expert parallelism on gloo (model/expert_parallel.py): EP=2, EP=4 and FSDP2 on a dp 2 x ep 2 mesh reproduce the
EP=1 model (the same weights, the mean of the same per-rank losses) within 1e-5 in losses and gradients over
several AdamW steps, including ranks that receive no tokens at all and ranks whose tokens skip another rank.

One subprocess (this file run as a script) spawns 4 gloo ranks with torch.multiprocessing and runs every scenario;
every rank also builds the EP=1 reference itself (same seed, its peers' batches), so no results cross processes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
STEPS = 4
CLIP = 0.5


SCENARIOS = ("exchange", "train_ep2", "train_ep4", "train_fsdp", "train_fsdp_bf16")
WORLD = 4


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory) -> str:
    """One 4-rank gloo job runs every scenario in turn (starting 4 processes that import torch dominates the
    runtime on a small machine, so they are started once)."""
    rdzv = tmp_path_factory.mktemp("ep") / "rdzv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, str(WORLD), str(rdzv)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"


def _assert_ok(out: str, scenario: str) -> None:
    assert out.count(f"ok {scenario} ") == WORLD, out[-5000:]


def test_exchange_zero_splits_ep4(ranks_output):
    """The bare function with crafted routing (2 experts per rank): rank 0 sends only to itself, rank 1 to
    experts 0-5, rank 2 has no tokens, rank 3 sends only to rank 1's experts. So rank 3 receives nothing at all
    and rank 2 only from rank 1; forward and every gradient equal kernels.moe.moe_experts on all tokens, and rank
    3's experts get exact zero gradients."""
    _assert_ok(ranks_output, "exchange")


def test_ep2_training_matches_ep1(ranks_output):
    """Two independent EP=2 groups ({0, 1}, {2, 3}; no FSDP, replicated grads averaged over the group)."""
    _assert_ok(ranks_output, "train_ep2")


def test_ep4_training_matches_ep1(ranks_output):
    """EP=4 over all ranks (no FSDP), the last rank's experts starved on step 0, rank 0's first on step 1."""
    _assert_ok(ranks_output, "train_ep4")


def test_fsdp_dp2_ep2_matches_ep1(ranks_output):
    """FSDP2 on a (dp_shard 2 x ep 2) mesh: experts sharded over dp, everything else over all 4 ranks."""
    _assert_ok(ranks_output, "train_fsdp")


def test_fsdp_dp2_ep2_bf16_policy(ranks_output):
    """The same mesh under the bf16 precision policy (mixed-precision FSDP groups): close to EP=1 in bf16."""
    _assert_ok(ranks_output, "train_fsdp_bf16")


@pytest.mark.parametrize("ep, error", [
    (4, None),
    (3, "[hardware] ep: 3 does not divide [model] n_experts 16"),
    (0, "[hardware] ep: must be"),
    ("2", "[hardware] ep:"),
])
def test_recipe_ep_key(ep, error):
    from train.recipe_config import RecipeError, parse_recipe

    text = (ROOT / "train/configs/tiny.toml").read_text()
    assert "\n[hardware]\n" in text
    text = text.replace("\n[hardware]\n", f"\n[hardware]\nep = {ep!r}\n".replace("'", '"'))
    if error is None:
        assert parse_recipe(text, "x.toml").hardware.ep == ep
        return
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "x.toml")
    assert str(e.value).startswith(f"x.toml: {error}"), str(e.value)


def test_recipe_ep_must_divide_gpus():
    from train.recipe_config import RecipeError, parse_recipe

    text = (ROOT / "train/configs/tiny.toml").read_text().replace('device = "cpu"\ngpus = 1',
                                                                 'device = "cuda"\ngpus = 4\nep = 8')
    with pytest.raises(RecipeError, match=r"\[hardware\] ep: 8 does not divide \[hardware\] gpus 4"):
        parse_recipe(text, "x.toml")


def _dry_run(tmp_path, capsys, hardware: str) -> list[str]:
    """The tiny recipe's dry-run plan with its [hardware] table replaced (micro_batch 4, so 4 GPUs divide it)."""
    from model import cli
    from train import recipe

    text = (ROOT / "train/configs/tiny.toml").read_text()
    assert text.count('device = "cpu"\ngpus = 1\n') == 1
    tmp_path.mkdir()
    cfg = tmp_path / "t.toml"
    cfg.write_text(text.replace('device = "cpu"\ngpus = 1\n', hardware).replace("micro_batch = 16", "micro_batch = 4"))
    assert cli.run(recipe.main, ["--config", str(cfg), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    return [ln.strip() for ln in capsys.readouterr().out.splitlines()]


def test_dry_run_prints_the_ep_layout(tmp_path, capsys):
    """--dry-run shows the dp_shard x ep mesh for the planned GPUs, the experts per rank and what the all_to_all
    moves per step; ep = 1 says EP is off."""
    from train.recipe import load_recipe

    m = load_recipe("tiny").model  # the numbers below are for this shape
    assert (m.d_model, m.top_k, m.n_experts, m.n_moe_layers) == (128, 2, 16, 4)
    lines = _dry_run(tmp_path / "cuda", capsys, 'device = "cuda"\ngpus = 4\nep = 2\n')
    assert "expert parallel: ep 2 (mesh dp_shard 2 x ep 2, 8 experts per rank)" in lines
    assert ("ep rank r holds routed experts [8r, 8r + 8) of 16; expert weights FSDP2 over dp_shard 2, everything "
            "else over all 4 ranks") in lines
    # pretrain: 16 x 128 tokens / 4 ranks = 512 a rank, x top_k 2 = 1024 slot rows a MoE layer; forward and
    # backward each send the rows (128 bf16 = 256 B) + their fp32 gate (4 B) and get as many output rows back:
    # 1024 x 2 x (2 x 256 + 4) B x 4 layers, half of it to the other rank = 2,113,536 B = 2.0 MiB
    a2a = [ln for ln in lines if ln.startswith("all_to_all")]
    assert len(a2a) == 4  # one per stage
    assert a2a[0] == ("all_to_all (ep 2): 1,024 slot rows per rank per MoE layer per step (512 tokens x top_k 2) "
                      "x 4 layers, there and back, fwd + bwd: ~2.0 MiB leave each rank per step (balanced routing)")
    # on CPU the world is torchrun's: the whole step's rows (2048 tokens x 2), fp32 rows (512 B): 16.1 MiB cross
    lines = _dry_run(tmp_path / "cpu", capsys, 'device = "cpu"\ngpus = 1\nep = 2\n')
    assert "expert parallel: ep 2 (mesh dp_shard (world / 2) x ep 2, 8 experts per rank)" in lines
    assert ("all_to_all (ep 2): 4,096 slot rows per MoE layer per step over all ranks (2,048 tokens x top_k 2) x 4 "
            "layers, there and back, fwd + bwd: ~16.1 MiB cross ranks per step (balanced routing)") in lines
    lines = _dry_run(tmp_path / "off", capsys, 'device = "cpu"\ngpus = 1\n')
    assert [ln for ln in lines if ln.startswith("expert parallel")] == [
        "expert parallel: off (ep = 1: every rank holds all 16 routed experts, no all_to_all; [hardware] ep = N "
        "shards them over N ranks)"]
    assert not any(ln.startswith("all_to_all") for ln in lines)


def test_recipe_ep2_torchrun_matches_one_rank(tmp_path):
    """python -m train under torchrun with [hardware] ep = 2 (dp_shard 1 x ep 2, FSDP2 + all_to_all, the EP grad
    norm, DCP checkpoints, the full-model save) reproduces the 1-rank run's per-step losses and saved weights."""
    from train.testing import make_corpus, read_log, stage_toml, write_recipe

    files = make_corpus(tmp_path / "data")
    stage = stage_toml("pretrain", "pretrain", files["train"], 3, ckpt_every=2)
    one = write_recipe(tmp_path, files, stage).rename(tmp_path / "one.toml")
    text = one.read_text()
    assert '[hardware]\ndevice = "cpu"\n' in text
    two = tmp_path / "ep2.toml"
    two.write_text(text.replace('[hardware]\ndevice = "cpu"\n', '[hardware]\ndevice = "cpu"\nep = 2\n'))
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmds = ([sys.executable, "-m", "train", "--config", str(one), "--out", str(tmp_path / "r1"), "--no-generate"],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
             "--config", str(two), "--out", str(tmp_path / "r2"), "--no-generate"])
    # both at once: most of each run is process start-up and rendezvous, which overlap well
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e[-3000:]
    assert "expert parallel: mesh dp_shard 1 x ep 2" in errs[1]
    a, b = read_log(tmp_path / "r1" / "pretrain"), read_log(tmp_path / "r2" / "pretrain")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < TOL, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
    from model.io import load_model_dir

    m1, _ = load_model_dir(tmp_path / "r1" / "pretrain" / "model")
    m2, _ = load_model_dir(tmp_path / "r2" / "pretrain" / "model")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert (s1[k] - s2[k]).abs().max() < 1e-4, k


# ---------------------------------------------------------------------------------------------------------------
# the ranks (run as `python tests/test_expert_parallel.py WORLD RDZV_FILE`)

def _cfg():
    from model.config import get_config

    # tiny, fp32, the CPU reference kernels; router_bias_coeff > 0 so expert_bias steers selection
    return get_config("tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      n_experts=8, top_k=2, expert_ffn_dim=32, n_shared_experts=1, shared_ffn_dim=32,
                      max_seq_len=32, router_bias_coeff=1e-3, moe_backend="reference")


def _batch(step: int, rank: int, B: int = 2, T: int = 12):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 64, (B, T + 1), generator=g)


def _loss(model, ids_BT1):
    import torch.nn.functional as F

    logits = model(ids_BT1[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids_BT1[:, 1:].reshape(-1))
    return ce + model.aux_loss()


def _bias_for(step: int, E: int, P: int):
    """Step 0: no token may pick the last rank's experts (that rank receives zero rows from every rank);
    step 1: none may pick rank 0's first expert; later steps: free routing."""
    import torch

    b = torch.zeros(E)
    L = E // P
    if step == 0:
        b[E - L:] = -1e4
    elif step == 1:
        b[0] = -1e4
    return b


def _set_bias(model, b):
    for layer in model.layers:
        if layer.is_moe:
            layer.moe.expert_bias.copy_(b)
            layer.moe.load_accum.zero_()


def _check_rel(tag: str, a, b, tol: float) -> float:
    """||a - b|| <= tol ||b|| for the whole tensor (b == 0: a == 0 exactly)."""
    a, b = a.detach().float(), b.detach().float()
    ref = float(b.norm())
    err = float((a - b).norm())
    if not (err <= tol * ref if ref > 0 else err == 0):
        raise AssertionError(f"{tag}: ||diff|| {err:.3e} > {tol:g} x ||ref|| {ref:.3e}")
    return err / ref if ref > 0 else 0.0


def _check(tag: str, a, b, tol: float = TOL):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(b.abs().max()) if b.numel() else 0.0)
    if not err <= tol * scale:
        raise AssertionError(f"{tag}: max |diff| {err:.3e} > {tol:g} x {scale:.3g}")
    return err


def _scenario_exchange(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    from kernels.moe import moe_experts
    from model.expert_parallel import expert_parallel_experts

    E, D, F, K = 8, 16, 8, 2
    L = E // world
    g = torch.Generator().manual_seed(7)
    w13 = torch.randn(E, 2 * F, D, generator=g) * 0.3
    w2 = torch.randn(E, D, F, generator=g) * 0.3
    xs, ids, gates = [], [], []
    for r in range(world):
        T = [5, 7, 0, 3][r]
        gr = torch.Generator().manual_seed(100 + r)
        xs.append(torch.randn(T, D, generator=gr))
        allowed = {0: [0, 1], 1: list(range(6)), 2: [0], 3: [2, 3]}[r]  # global expert ids each rank may pick
        a = torch.tensor(allowed)
        pick = torch.stack([a[torch.randperm(len(a), generator=gr)[:K]] if len(a) >= K else a.repeat(K)[:K]
                            for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
        ids.append(pick.long())
        gates.append(torch.rand(T, K, generator=gr))
    # the dense reference over every rank's tokens
    ref = [t.clone().requires_grad_() for t in (torch.cat(xs), torch.cat(gates), w13, w2)]
    y_ref = moe_experts(ref[0], torch.cat(ids), ref[1], ref[2], ref[3], backend="reference")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(9))
    y_ref.backward(dy)
    lo = sum(x.shape[0] for x in xs[:rank])
    hi = lo + xs[rank].shape[0]
    mine = [xs[rank].clone().requires_grad_(), gates[rank].clone().requires_grad_(),
            w13[rank * L:(rank + 1) * L].clone().requires_grad_(), w2[rank * L:(rank + 1) * L].clone().requires_grad_()]
    group = dist.group.WORLD
    y = expert_parallel_experts(mine[0], ids[rank], mine[1], mine[2], mine[3], group, backend="reference")
    _check("y", y, y_ref[lo:hi])
    y.backward(dy[lo:hi])
    _check("dx", mine[0].grad, ref[0].grad[lo:hi])
    _check("dgates", mine[1].grad, ref[1].grad[lo:hi])
    # the EP weight gradient is the mean over the ranks' contributions: world x it is the sum over all tokens
    _check("dw13", mine[2].grad * world, ref[2].grad[rank * L:(rank + 1) * L])
    _check("dw2", mine[3].grad * world, ref[3].grad[rank * L:(rank + 1) * L])
    # bf16 rows travel as bf16, gates as fp32 (model/precision.py): the same rounding as the dense bf16 path
    bf = lambda t: t.to(torch.bfloat16)
    y16_ref = moe_experts(bf(torch.cat(xs)), torch.cat(ids), torch.cat(gates), bf(w13), bf(w2), backend="reference")
    y16 = expert_parallel_experts(bf(xs[rank]), ids[rank], gates[rank], bf(w13[rank * L:(rank + 1) * L]),
                                  bf(w2[rank * L:(rank + 1) * L]), group, backend="reference")
    assert y16.dtype == torch.bfloat16
    err16 = float((y16.float() - y16_ref[lo:hi].float()).abs().max()) if hi > lo else 0.0
    assert err16 <= 2 ** -8 * max(1.0, float(y16_ref.float().abs().max())), err16
    if rank == 1:  # rank 1's experts 2, 3 get tokens; rank 3's experts 6, 7 get none: exact zero gradients
        assert bool(mine[2].grad.abs().sum() > 0)
    if rank == 3:
        assert bool((mine[2].grad == 0).all()) and bool((mine[3].grad == 0).all())
    print(f"ok exchange rank {rank} (bf16 max diff {err16:.2e})", flush=True)


def _train(rank: int, world: int, scenario: str) -> None:
    import torch
    import torch.distributed as dist

    from model.expert_parallel import (
        allreduce_replicated_grads,
        clip_grad_norm_,
        is_expert_param,
        shard_model_ep,
    )
    from model.model import MobileMoE

    cfg = _cfg()
    ref = MobileMoE(cfg).train()
    model = copy.deepcopy(ref)
    fsdp = scenario.startswith("train_fsdp")
    policy = None
    if scenario == "train_fsdp_bf16":  # the CUDA policy's CPU twin: bf16 gathers and matmuls, fp32 router/grads
        from model.precision import BF16

        policy = BF16
        ref.set_precision(policy)
        model.set_precision(policy)
    # bf16: the same operands, but FSDP's bf16 all-gather vs the reference's per-matmul cast and different
    # reduction orders round differently: losses within 2e-2, each gradient within 5 % of its norm (a wrong
    # scale or a missing reduction is off by 50 % or more), one step (AdamW amplifies the noise of tiny grads)
    tol = TOL if policy is None else 2e-2
    steps = STEPS if policy is None else 1
    peers = list(range(world))  # the ranks whose mean loss this rank's model follows
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        dp, ep = 2, world // 2
        mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
        world_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
        ep_group, P = mesh["ep"].get_group(), ep
        model.set_expert_parallel(mesh["ep"])
        shard_model_ep(model, world_mesh, mesh["dp"], policy)
    elif scenario == "train_ep2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("groups", "ep"))  # ep groups {0, 1}, {2, 3}
        ep_group, P = mesh["ep"].get_group(), 2
        peers = [2 * (rank // 2), 2 * (rank // 2) + 1]
        model.set_expert_parallel(mesh["ep"])
    else:
        ep_group, P = dist.group.WORLD, world
        model.set_expert_parallel(ep_group)  # a ProcessGroup works too
    E, L = cfg.n_experts, cfg.n_experts // P
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    worst = 0.0
    for step in range(steps):
        b = _bias_for(step, E, P)
        _set_bias(ref, b)
        _set_bias(model, b)
        # EP=1: the mean of every rank's loss, each on its own batch (aux losses are per-batch, as per rank)
        ref_losses = [_loss(ref, _batch(step, r)) for r in peers]
        sum(ref_losses).div(len(peers)).backward()
        loss = _loss(model, _batch(step, rank))
        loss.backward()
        if not fsdp:
            allreduce_replicated_grads(model, ep_group)
        lt = loss.detach().clone()
        dist.all_reduce(lt, group=ep_group if scenario == "train_ep2" else None)
        n = len(peers)
        worst = max(worst, _check(f"step {step} loss", lt / n, sum(x.detach() for x in ref_losses) / n, tol))
        _check(f"step {step} own loss", loss.detach(), ref_losses[peers.index(rank)].detach(), tol)
        if step == 0:  # the last EP rank received nothing: its experts' gradients are exactly zero
            counts = torch.stack([layer.moe.last["counts"] for layer in model.layers if layer.is_moe])
            assert int(counts[:, E - L:].sum()) == 0
        # clipping active (the tiny model's norm is above 0.5): the EP norm over two meshes equals EP=1's
        gn_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        gn = clip_grad_norm_(model.parameters(), CLIP)
        assert float(gn_ref) > CLIP, float(gn_ref)
        worst = max(worst, _check(f"step {step} grad norm", gn, gn_ref, tol))
        ref_p = dict(ref.named_parameters())
        for name, p in model.named_parameters():  # DTensors (experts; everything under FSDP): gathered whole
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if policy is None:
                worst = max(worst, _check(f"step {step} grad {name}", g, ref_p[name].grad))
            else:
                worst = max(worst, _check_rel(f"step {step} grad {name}", g, ref_p[name].grad, 5e-2))
            if step == 0 and is_expert_param(name):
                assert bool((g[E - L:] == 0).all()), name
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    ref_p = dict(ref.named_parameters())
    worst_w = 0.0
    for name, p in model.named_parameters():  # after STEPS AdamW steps the weights still agree
        w = p.full_tensor() if hasattr(p, "full_tensor") else p
        if policy is None:
            worst_w = max(worst_w, _check(f"weight {name}", w.detach(), ref_p[name].detach()))
    # the full state dict holds whole experts, as a plain model's (what train/recipe.py's plain_copy saves)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ref_sd = ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd if policy is None else ():
        _check(f"state dict {k}", sd[k], ref_sd[k])
    weights = f"{worst_w:.2e}" if policy is None else "not compared"
    print(f"ok {scenario} rank {rank} max diff: losses/grads {worst:.2e}, weights after {steps} steps {weights}",
          flush=True)


def _worker(rank: int, world: int, rdzv: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for scenario in SCENARIOS:  # a failure stops this rank (the others then fail on the gloo timeout/EOF)
            t0 = time.perf_counter()
            if scenario == "exchange":
                _scenario_exchange(rank, world)
            else:
                _train(rank, world, scenario)
            if rank == 0:
                print(f"time {scenario} {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    world, rdzv = int(sys.argv[1]), sys.argv[2]
    # fork after importing everything once: 4 ranks importing torch afresh cost more than the scenarios
    import torch
    import torch.distributed.fsdp  # noqa: F401

    import model.expert_parallel  # noqa: F401
    import model.model  # noqa: F401

    torch.set_num_threads(1)
    mp.start_processes(_worker, args=(world, rdzv), nprocs=world, start_method="fork")
