"""Checkpoint saves killed (SIGKILL, no Python cleanup) at every fault point in train/ckpt.py leave a loadable
checkpoint that is exactly one of the saved states, the new one only once it was renamed in; the next save repairs
the directory. Run as a script, this file is the driver: one process imports torch once, then forks a child per
(scenario, fault point) that dies inside save_checkpoint."""

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
# scenario -> (good saves as (step, version, keep), the faulted save (step, version, keep))
SCENARIOS = {
    "new_step": ([(1, 0, 1)], (2, 1, 1)),              # keep=1: the save prunes step 1 after step 2 is in
    "same_step": ([(0, 0, 2), (1, 0, 2)], (1, 1, 1)),  # re-save of step 1: aside, rename in, discard, prune step 0
}


def _states(step: int, version: int) -> tuple[dict, dict, dict]:
    base = 1000.0 * step + 100.0 * version
    ms = {"w_DF": torch.arange(48, dtype=torch.float32).reshape(6, 8) + base, "b_F": torch.full((8,), base + 0.5)}
    osd = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.arange(8.0) * (version + 1)}},
           "param_groups": [{"lr": 1e-3 * (version + 1), "params": [0]}]}
    return ms, osd, {"fingerprint": "fp", "version": version}


def _save(stage: Path, tok: Path, step: int, version: int, keep: int) -> Path:
    ms, osd, st = _states(step, version)
    return ck.save_checkpoint(stage, step, ms, osd, st, tok, keep=keep)


def _driver(base: Path) -> None:
    torch.set_num_threads(1)  # no intra-op thread pool alive across fork()
    tok = base / "tokenizer.json"
    tok.write_text('{"model": "tiny"}')
    status = {}
    for scen, (good, (step, version, keep)) in SCENARIOS.items():
        for point in ck.FAULT_POINTS:
            stage = base / scen / point
            for g in good:
                _save(stage, tok, *g)
            pid = os.fork()
            if pid == 0:
                try:
                    os.environ[ck.FAULT_ENV] = point
                    _save(stage, tok, step, version, keep)
                    os._exit(0)
                except BaseException:  # noqa: BLE001  (the child must never return into the driver)
                    import traceback

                    traceback.print_exc()
                    os._exit(3)
            _, st = os.waitpid(pid, 0)
            status[f"{scen}/{point}"] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
    print(json.dumps(status))


def _check_loads_as_saved(path: Path) -> tuple[int, int]:
    """Load `path`; it must equal _states(step, version) exactly. -> (step, version)."""
    ms, payload, st = ck.load_checkpoint(path, "fp")
    step, version = int(st["step"]), int(st["version"])
    ems, eosd, _ = _states(step, version)
    assert ms.keys() == ems.keys() and all(torch.equal(ms[k], ems[k]) for k in ems), path
    got, want = payload["optim"], eosd
    assert got["param_groups"] == want["param_groups"], path
    assert torch.equal(got["state"][0]["exp_avg"], want["state"][0]["exp_avg"]), path
    assert torch.equal(got["state"][0]["step"], want["state"][0]["step"]), path
    assert (path / "tokenizer.json").read_text() == '{"model": "tiny"}'
    return step, version


def test_kill_at_every_fault_point_leaves_a_loadable_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(ck.FAULT_ENV, None)
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads(r.stdout.strip().splitlines()[-1])
    new_from = ck.FAULT_POINTS.index(ck.NEW_VISIBLE_FROM)
    tok = tmp_path / "tokenizer.json"
    for scen, (good, (step, version, _)) in SCENARIOS.items():
        old_step, old_version = good[-1][:2]
        for i, point in enumerate(ck.FAULT_POINTS):
            case = f"{scen}/{point}"
            stage = tmp_path / scen / point
            # every point kills the save, except the aside point when there is no same-step folder to move aside
            fires = not (scen == "new_step" and point == "after_aside")
            assert status[case] == (-9 if fires else 0), (case, status[case])
            want = (step, version) if (i >= new_from or not fires) else (old_step, old_version)
            latest = ck.latest_checkpoint(stage)
            assert latest is not None, case
            assert _check_loads_as_saved(latest) == want, case
            for p in ck.list_checkpoints(stage):  # nothing listed is half-written
                _check_loads_as_saved(p)
            if case == "same_step/after_aside":  # the reader uses the aside folder without touching it
                assert latest.name == ".step_00000001.aside" and not (stage / "ckpt" / "step_00000001").exists()
            # the next normal save works and leaves a clean directory with the crash survivor at its final name
            _save(stage, tok, 3, 2, 2)
            cks = ck.list_checkpoints(stage)
            assert [p.name for p in cks] == [f"step_{want[0]:08d}", "step_00000003"], case
            assert _check_loads_as_saved(cks[0]) == want and _check_loads_as_saved(cks[1]) == (3, 2), case
            assert sorted(p.name for p in (stage / "ckpt").iterdir()) == [p.name for p in cks], case


def test_failed_save_keeps_previous_and_bad_arguments_are_refused(tmp_path, monkeypatch):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": "tiny"}')
    _save(tmp_path, tok, 1, 0, 2)
    ms, osd, st = _states(1, 1)
    # an ordinary exception mid-save (not a kill): the old same-step checkpoint stays, no temp folder is left
    with pytest.raises(FileNotFoundError):
        ck.save_checkpoint(tmp_path, 1, ms, osd, st, tmp_path / "missing.json")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000001"]
    assert _check_loads_as_saved(ck.latest_checkpoint(tmp_path)) == (1, 0)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ck.save_checkpoint(tmp_path, 2, ms, osd, st, tok, keep=0)
    monkeypatch.setenv(ck.FAULT_ENV, "after_modle")
    with pytest.raises(ValueError, match="is not a fault point"):
        ck.save_checkpoint(tmp_path, 2, ms, osd, st, tok)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    monkeypatch.delenv(ck.FAULT_ENV)
    _save(tmp_path, tok, 5, 0, 1)  # prunes step 1
    _save(tmp_path, tok, 3, 0, 1)  # an older step saved after a newer one (resume from an explicit path): kept
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000005"]


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
