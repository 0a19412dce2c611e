"""Sharded (torch.distributed.checkpoint) training checkpoints, train/ckpt.py:

- resharding: a checkpoint saved by train_stage at world size 2 (FSDP2 on gloo) resumes at world size 1 and one
  saved at world size 1 resumes at world size 2; the restored full model + optimizer state equals the saved one
  exactly, and the next two steps' losses equal the uninterrupted run's (step 1 checks the weights, step 2 the
  restored optimizer moments);
- crash safety: a sharded save SIGKILLed at every fault point leaves a checkpoint that restores exactly to one
  of the saved states, the new one only once it was renamed in, and the next save repairs the directory;
- full-layout checkpoints (written before the sharded layout) still restore; damaged ones are refused.

Run as a script this file is the driver of the first two (`reshard <out>`, which runs `train two <out> train`
under torchrun; `faults <out>`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import ckpt as ck

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_AT = 5, 3
_SAVE, _RESTORE = ck.save_sharded_checkpoint, ck.restore_checkpoint  # the real ones, under the drivers' hooks


# ---- resharding across world sizes ------------------------------------------------------------------------
def _stage():
    from train.loop import StageConfig

    return StageConfig(name="pretrain", tokens=STEPS * 16 * 8, seq_len=16, global_batch=8, micro_batch=4, lr=3e-3,
                       min_lr=3e-4, warmup_frac=0.2, ckpt_every=SAVE_AT, log_every=1)


def _model(world: int):
    from model.config import get_config
    from model.model import MobileMoE
    from model.precision import policy_for
    from train.parallel import wrap_fsdp

    torch.manual_seed(0)  # every rank builds the same full weights before sharding
    cfg = get_config("tiny", vocab_size=96, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=4,
                     top_k=2, expert_ffn_dim=32, shared_ffn_dim=32, max_seq_len=32, router_bias_coeff=0.01)
    return wrap_fsdp(MobileMoE(cfg), policy_for(torch.device("cpu")))


def _full(model, optim) -> dict:
    """Collective: the full model + optimizer state on every rank (the test's reference, not the save path)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def _train_driver(tag: str, out: Path, what: str) -> None:
    """tag one | two (world size 1 | 2). what = train: train STEPS steps from scratch into out/<tag>, then, if
    the other world size's run exists, resume its checkpoint at SAVE_AT into out/resume_<tag>; what = resume:
    only the latter. Every save records the full state it saves, every restore the full state it restored."""
    import torch.distributed as dist

    from train import loop
    from train.batches import Batcher, LMSource

    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = loop.dist_info()
    save, restore = _SAVE, _RESTORE

    def save_hook(stage_dir, step, model, optim, *a, **k):
        full = _full(model, optim)
        if rank == 0:
            torch.save(full, out / f"saved_{tag}_{step}.pt")
        return save(stage_dir, step, model, optim, *a, **k)

    def restore_hook(path, model, optim, *a, **k):
        st = restore(path, model, optim, *a, **k)
        full = _full(model, optim)
        if rank == 0:
            torch.save(full, out / f"restored_{tag}.pt")
        return st

    ck.save_sharded_checkpoint, ck.restore_checkpoint = save_hook, restore_hook
    ids = torch.randint(0, 96, (3000,), generator=torch.Generator().manual_seed(1))
    batcher = Batcher([LMSource(ids)], [1.0], 16, 8, 0)
    other = out / ("two" if tag == "one" else "one") / "ckpt" / f"step_{SAVE_AT:08d}"
    runs = [(out / tag, None)] if what == "train" else []
    runs += [(out / f"resume_{tag}", other)] if other.is_dir() else []
    for sdir, resume in runs:
        loop.train_stage(_model(world), _stage(), batcher, stage_dir=sdir, resume=resume, fingerprint="fp",
                         progress=False, device="cpu", seed=0)
    if world > 1:
        dist.destroy_process_group()


def _reshard_driver(out: Path) -> None:
    """One process (no process group: the `make train` path) around a 2-rank FSDP2 torchrun on gloo."""
    _train_driver("one", out, "train")
    _launch(2, "train", "two", str(out), "train")  # trains, then resumes the 1-rank checkpoint
    _train_driver("one", out, "resume")  # resumes the 2-rank checkpoint


def _launch(world: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    env.pop(ck.FAULT_ENV, None)
    head = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={world}"]
    r = subprocess.run([*head, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def _assert_equal_state(a: dict, b: dict, what: str) -> None:
    assert a["model"].keys() == b["model"].keys(), what
    assert any("expert_bias" in k for k in a["model"]), what  # the router-bias buffers travel too
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (what, k)
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0, what
    for k in sa:
        assert sa[k].keys() == sb[k].keys() == {"step", "exp_avg", "exp_avg_sq"}, (what, k)
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), (what, k, n)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"], what


def test_sharded_checkpoint_resumes_across_world_sizes(tmp_path):
    from train.testing import read_log

    _launch(1, "reshard", str(tmp_path))
    two_ck = tmp_path / "two" / "ckpt" / f"step_{SAVE_AT:08d}"
    st = json.loads((two_ck / "state.json").read_text())
    assert st["format"] == "dcp" and st["world_size"] == 2 and st["data_position"] == SAVE_AT
    # each rank wrote its own shard file and RNG state; neither shard file holds the full state
    shards = sorted(p.name for p in two_ck.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    total = sum((two_ck / s).stat().st_size for s in shards)
    assert all((two_ck / s).stat().st_size < 0.7 * total for s in shards)
    assert (two_ck / "rng_rank00001.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir()) == ["step_00000003", "step_00000005"]

    for src, dst in (("one", "two"), ("two", "one")):  # dst's world size restored src's checkpoint
        saved = torch.load(tmp_path / f"saved_{src}_{SAVE_AT}.pt", weights_only=True)
        _assert_equal_state(saved, torch.load(tmp_path / f"restored_{dst}.pt", weights_only=True), f"{src}->{dst}")
        ref, got = read_log(tmp_path / src), read_log(tmp_path / f"resume_{dst}")
        assert [x["step"] for x in ref] == list(range(STEPS)), src
        assert [x["step"] for x in got] == list(range(SAVE_AT, STEPS)), dst
        for a, b in zip(ref[SAVE_AT:], got):
            assert abs(a["loss"] - b["loss"]) < 1e-6, (f"{src}->{dst}", a["step"], a["loss"], b["loss"])
    # and the resumed runs saved their final sharded checkpoint like any other
    assert ck.latest_checkpoint(tmp_path / "resume_one").name == f"step_{STEPS:08d}"


# ---- crash safety of the sharded writer (world size 1) ------------------------------------------------------
# scenario -> (good saves as (step, version, keep), the faulted save (step, version, keep)), as in test_ckpt_crash
SCENARIOS = {
    "new_step": ([(1, 0, 1)], (2, 1, 1)),
    "same_step": ([(0, 0, 2), (1, 0, 2)], (1, 1, 1)),
}


def _make(step: int, version: int):
    """A model + AdamW whose weights and optimizer state are a function of (step, version)."""
    m = torch.nn.Linear(4, 3)
    base = 1000.0 * step + 100.0 * version
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(3, 4) + base)
        m.bias.fill_(base + 0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3 * (version + 1))
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.25 * (version + 1))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return m, opt


def _save(stage: Path, step: int, version: int, keep: int) -> Path:
    m, opt = _make(step, version)
    return ck.save_sharded_checkpoint(stage, step, m, opt, {"fingerprint": "fp", "version": version}, None,
                                      keep=keep)


def _restores_as_saved(path: Path) -> tuple[int, int]:
    """Restore `path` into a fresh model; it must equal _make(step, version) exactly. -> (step, version)."""
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.5)
    st = ck.restore_checkpoint(path, m, opt, "fp")
    step, version = int(st["step"]), int(st["version"])
    em, eopt = _make(step, version)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), em.state_dict().values())), path
    got, want = opt.state_dict(), eopt.state_dict()
    # (the full layout has always handed back betas as a list; AdamW unpacks either)
    assert [dict(g, betas=tuple(g["betas"])) for g in got["param_groups"]] == want["param_groups"], path
    for i in want["state"]:
        for k in want["state"][i]:
            assert torch.equal(got["state"][i][k], want["state"][i][k]), (path, i, k)
    return step, version


def _faults_driver(base: Path) -> None:
    torch.set_num_threads(1)  # no intra-op thread pool alive across fork()
    status = {}
    for scen, (good, (step, version, keep)) in SCENARIOS.items():
        for point in ck.FAULT_POINTS:
            stage = base / scen / point
            for g in good:
                _save(stage, *g)
            pid = os.fork()
            if pid == 0:
                try:
                    os.environ[ck.FAULT_ENV] = point
                    _save(stage, step, version, keep)
                    os._exit(0)
                except BaseException:  # noqa: BLE001  (the child must never return into the driver)
                    import traceback

                    traceback.print_exc()
                    os._exit(3)
            _, st = os.waitpid(pid, 0)
            status[f"{scen}/{point}"] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
    print(json.dumps(status))


def test_sharded_save_killed_at_every_fault_point_leaves_a_restorable_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(ck.FAULT_ENV, None)
    r = subprocess.run([sys.executable, __file__, "faults", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads(r.stdout.strip().splitlines()[-1])
    new_from = ck.FAULT_POINTS.index(ck.NEW_VISIBLE_FROM)
    for scen, (good, (step, version, _)) in SCENARIOS.items():
        old = good[-1][:2]
        for i, point in enumerate(ck.FAULT_POINTS):
            case = f"{scen}/{point}"
            stage = tmp_path / scen / point
            fires = not (scen == "new_step" and point == "after_aside")  # no same-step folder to move aside
            assert status[case] == (-9 if fires else 0), (case, status[case])
            want = (step, version) if (i >= new_from or not fires) else old
            before = sorted(p.name for p in (stage / "ckpt").iterdir())
            assert _restores_as_saved(ck.latest_checkpoint(stage)) == want, case
            for p in ck.list_checkpoints(stage):  # nothing listed is half-written
                _restores_as_saved(p)
            assert sorted(p.name for p in (stage / "ckpt").iterdir()) == before, case  # readers never write
            _save(stage, 3, 2, 2)  # the next save repairs: the crash survivor at its final name, nothing else
            cks = ck.list_checkpoints(stage)
            assert [p.name for p in cks] == [f"step_{want[0]:08d}", "step_00000003"], case
            assert _restores_as_saved(cks[0]) == want and _restores_as_saved(cks[1]) == (3, 2), case
            assert sorted(p.name for p in (stage / "ckpt").iterdir()) == [p.name for p in cks], case


# ---- the full layout still restores; damaged sharded checkpoints are refused ---------------------------------
def test_full_layout_restores_and_damaged_sharded_is_refused(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    m, opt = _make(4, 1)
    msd, osd = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    old = ck.save_checkpoint(tmp_path / "full", 4, msd, osd, {"fingerprint": "fp", "version": 1}, None)
    assert not ck.is_sharded(old) and _restores_as_saved(old) == (4, 1)

    p = _save(tmp_path / "dcp", 4, 1, 2)
    assert ck.is_sharded(p) and ck.missing_file(p) is None
    ms, payload, st = ck.load_checkpoint(p, "fp")  # the whole state in one process, for tools
    assert torch.equal(ms["weight"], m.weight.detach()) and st["world_size"] == 1 and "torch" in payload["rng"]
    assert torch.equal(payload["optim"]["state"]["weight"]["exp_avg"], opt.state[m.weight]["exp_avg"])
    fresh = torch.nn.Linear(4, 3)
    fopt = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(ck.CheckpointError, match="different model/stage config"):
        ck.restore_checkpoint(p, fresh, fopt, "other")
    shard = p / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ck.CheckpointError, match=r"unreadable sharded state \(") as e:
        ck.restore_checkpoint(p, fresh, fopt, "fp")
    assert "\n" not in str(e.value)
    (p / ck.DCP_METADATA).unlink()  # state.json still names the layout
    with pytest.raises(ck.CheckpointError, match=r"incomplete \(no \.metadata\)"):
        ck.restore_checkpoint(p, fresh, fopt, "fp")
    (tmp_path / "empty").mkdir()
    assert ck.missing_file(tmp_path / "empty").startswith("model.safetensors")
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_checkpoint(tmp_path / "empty")


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _train_driver(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "reshard":
        _reshard_driver(Path(sys.argv[2]))
    else:
        _faults_driver(Path(sys.argv[2]))
