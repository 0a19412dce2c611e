"""Scaling-law tool: the fit recovers known constants, the optimizer respects budgets and returns valid
ModelConfigs, and a 2-point micro-sweep runs end to end and resumes (synthetic corpus, no network)."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from model import cli
from model.config import ModelConfig, flops_per_token, get_config, int4_weight_bytes, kv_cache_bytes
from train import scaling
from train.scaling_law import LawParams, default_starts, fit_law, predict
from train.scaling_opt import Budget, SearchSpace, optimize

TRUE = LawParams(E0=1.1, A=0.9, alpha=0.34, delta=0.18, rho=0.92, g=0.6, gamma=0.9, B=1.4, beta=0.28)


def _synthetic(noise: float, seed: int = 0):
    rows = []
    for N, X, G, S, Dm in itertools.product([3e5, 3e6, 3e7, 3e8], [1, 4, 16], [1, 4], [0, 1], [2, 30]):
        if X == 1 and (G != 1 or S):
            continue  # a dense model has no granularity or shared expert
        if G == 1 and S:
            continue
        rows.append((N, N * Dm, X, G, S))
    N, D, X, G, S = (np.array(a, dtype=float) for a in zip(*rows))
    rng = np.random.default_rng(seed)
    y = predict(TRUE, N, D, X, G, S) * np.exp(rng.normal(0.0, noise, len(N)))
    return N, D, X, G, S, y


def test_fit_recovers_known_constants():
    N, D, X, G, S, y = _synthetic(noise=0.003)
    res = fit_law(N, D, X, G, S, y, starts=default_starts()[::8], n_boot=2, seed=0)
    p = res.params
    # the exponents and the irreducible loss are what the optimizer relies on
    assert p.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert p.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert p.delta == pytest.approx(TRUE.delta, abs=0.03)
    assert p.E0 == pytest.approx(TRUE.E0, rel=0.02)
    assert p.rho == pytest.approx(TRUE.rho, abs=0.03)
    # g and gamma trade off against A; the granularity effect itself must be recovered
    gain_true = (1 + TRUE.g * 16 ** -TRUE.gamma) / (1 + TRUE.g)
    gain_fit = (1 + p.g * 16 ** -p.gamma) / (1 + p.g)
    assert gain_fit == pytest.approx(gain_true, abs=0.03)
    # and predictions away from the data (bigger N) stay close
    Nq = np.array([1e9, 2e9])
    q_true = predict(TRUE, Nq, 20 * Nq, np.array([8, 8]), np.array([4, 8]), np.array([1, 0]))
    q_fit = predict(p, Nq, 20 * Nq, np.array([8, 8]), np.array([4, 8]), np.array([1, 0]))
    assert np.all(np.abs(q_fit / q_true - 1) < 0.01)
    assert set(res.ci) == set(p.as_dict())
    for k, (lo, hi) in res.ci.items():
        assert lo <= hi, k


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="N > 0"):
        fit_law([0, 1e6, 1e6, 1e6], [1e6] * 4, [1] * 4, [1] * 4, [0] * 4, [3.0] * 4, n_boot=0)
    with pytest.raises(ValueError, match="at least 4"):
        fit_law([1e6], [1e6], [1], [1], [0], [3.0], n_boot=0)


SMALL_SPACE = SearchSpace(d_models=(512, 768, 1024, 1536), n_layers=(12, 20, 28), ffn_mults=(2.75,),
                          X=(1, 4, 16, 64), G=(1, 4, 8), shared=(0, 1))


def _assert_within(c, budget: Budget, memory: bool = True):
    cfg = get_config("S", **c.overrides)  # usable as a preset
    assert isinstance(cfg, ModelConfig)
    assert cfg.to_dict() == c.cfg.to_dict()
    fl = flops_per_token(cfg, budget.context)
    assert fl == c.flops
    if budget.active_flops is not None:
        assert fl <= budget.active_flops
    if budget.latency_ms is not None:
        assert int4_weight_bytes(cfg)["read_per_token"] / (budget.bandwidth_gbs * 1e9) * 1e3 <= budget.latency_ms
    if memory:
        assert int4_weight_bytes(cfg)["total"] + kv_cache_bytes(cfg, budget.context) <= budget.memory_bytes


@pytest.mark.parametrize("mem_gb,flops,lat", [(1.0, 0.9e9, None), (0.4, 1.5e9, None), (2.0, None, 6.0)])
def test_optimizer_respects_budgets(mem_gb, flops, lat):
    budget = Budget(memory_bytes=mem_gb * 1e9, context=2048, active_flops=flops, latency_ms=lat)
    best, front, cands = optimize(TRUE, budget, SMALL_SPACE)
    assert best is not None and cands
    _assert_within(best, budget)
    for c in front:
        _assert_within(c, budget, memory=False)
    feasible = [c for c in cands if c.memory_bytes <= budget.memory_bytes]
    assert best.loss <= min(c.loss for c in feasible) * (1 + 1e-4)
    # the frontier is monotone: more memory only where it buys a lower loss
    assert all(a.memory_bytes <= b.memory_bytes and a.loss > b.loss for a, b in zip(front, front[1:]))


def test_optimizer_memory_binds_and_infeasible():
    loose = Budget(memory_bytes=3e9, context=2048, active_flops=1.5e9)
    tight = Budget(memory_bytes=0.4e9, context=2048, active_flops=1.5e9)
    b_loose, _, _ = optimize(TRUE, loose, SMALL_SPACE)
    b_tight, _, _ = optimize(TRUE, tight, SMALL_SPACE)
    assert b_tight.memory_bytes <= 0.4e9 < b_loose.memory_bytes
    assert b_loose.loss < b_tight.loss
    none, _, _ = optimize(TRUE, Budget(memory_bytes=1e6, context=2048, active_flops=1.5e9), SMALL_SPACE)
    assert none is None


def test_optimize_cli(tmp_path, capsys):
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps(dict(params=TRUE.as_dict())))
    rc = scaling.main(["optimize", "--memory-gb", "1", "--context", "2048", "--active-flops", "0.9e9",
                       "--fit", str(fit), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cfg = get_config(out["preset"]["base"], **out["preset"]["overrides"])
    assert flops_per_token(cfg, 2048) <= 0.9e9
    assert int4_weight_bytes(cfg)["total"] + kv_cache_bytes(cfg, 2048) <= 1e9
    # bad input: one line naming the problem, non-zero exit
    assert cli.run(scaling.main, ["optimize", "--memory-gb", "1", "--fit", str(fit)]) == 2
    assert "compute budget" in capsys.readouterr().err
    assert cli.run(scaling.main, ["optimize", "--memory-gb", "1", "--active-flops", "1e9",
                                  "--fit", str(tmp_path / "missing.json")]) == 2
    assert "no fitted law" in capsys.readouterr().err


def _micro_spec() -> scaling.GridSpec:
    pts = []
    for name, X, G, s in (("m-dense", 1, 1, 0), ("m-moe", 4, 4, 1)):
        o = scaling.arch_overrides(32, 1, X, G, s, max_seq_len=64)
        pts.append(scaling.GridPoint(name=name, base="tiny", overrides=o, tokens=4 * 32 * 4,
                                     family="dense" if X == 1 else "moe", X=float(X), G=float(G)))
    return scaling.GridSpec("micro", pts, seq_len=32, batch_size=4, lr=3e-3, tokenizer="bytes")


def test_micro_sweep_end_to_end_and_resumes(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "love", "night", "sword", "crown", "fair", "doth", "thou"]
    corpus.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    out = tmp_path / "sweep.csv"
    spec = _micro_spec()
    logs = []
    rows = scaling.run_sweep(spec, out, corpus=str(corpus), val_tokens=1024, threads=1, log=logs.append)
    assert [r["name"] for r in rows] == ["m-dense", "m-moe"]
    with open(out, newline="") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == 2
    for r in on_disk:
        assert math.isfinite(float(r["val_loss"])) and 0 < float(r["val_loss"]) < 10
        assert int(r["tokens"]) == 4 * 32 * 4
        cfg = get_config(r["base"], **json.loads(r["overrides"]))
        assert int(r["n_experts"]) == cfg.n_experts
    assert int(on_disk[1]["total_params"]) > int(on_disk[1]["active_params"])

    # resume: finished points are skipped (training them again would raise)
    import train.loop

    def boom(*a, **k):
        raise AssertionError("a finished point was retrained")

    monkeypatch.setattr(train.loop, "quick_pretrain", boom)
    scaling.run_sweep(spec, out, corpus=str(corpus), val_tokens=1024, log=logs.append)
    assert "0 to run" in logs[-1]
    # a sweep killed after its first point: only the missing point runs
    monkeypatch.undo()
    scaling.write_csv_atomic(out, on_disk[:1])
    logs.clear()
    rows = scaling.run_sweep(spec, out, corpus=str(corpus), val_tokens=1024, threads=1, log=logs.append)
    assert "1 done, 1 to run" in logs[0]
    assert [r["name"] for r in rows] == ["m-dense", "m-moe"]
    assert rows[0]["val_loss"] == on_disk[0]["val_loss"]


def test_cpu_grid_is_valid():
    spec = scaling.get_grid("cpu")
    assert len(spec.points) >= 16
    assert sum(p.family == "dense" for p in spec.points) >= 3
    assert any(p.holdout for p in spec.points)
    held = [p for p in spec.points if p.holdout]
    biggest = max(scaling.point_row(p, spec)["active_params"] for p in spec.points)
    assert all(scaling.point_row(p, spec)["active_params"] >= 0.5 * biggest for p in held)
    for p in spec.points:
        cfg = p.config()  # a valid ModelConfig via get_config
        if p.family == "moe":
            # every MoE variant keeps the dense FFN's active width
            assert (cfg.top_k + cfg.n_shared_experts) * cfg.expert_ffn_dim == cfg.ffn_dim
            assert cfg.n_experts / cfg.top_k == p.X
    assert len({p.name for p in spec.points}) == len(spec.points)
