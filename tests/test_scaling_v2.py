"""train.scaling_v2 (the v2 grid: plan, LR rule, resume, lock) and train.scaling_v2_fit (anchor LRs, seed
aggregation, the two-level bootstrap fit, verdicts, report) on synthetic rows, plus one micro run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.config import count_params
from train import scaling_v2 as V
from train import scaling_v2_fit as F
from train.scaling_law import LawParams, default_starts, predict
from train.scaling_opt import SearchSpace

TRUE = LawParams(E0=1.5, A=1.2, alpha=0.35, delta=0.2, rho=0.9, g=0.7, gamma=1.0, B=1.6, beta=0.3)
SMALL_SPACE = SearchSpace(d_models=(512, 1024, 1536), n_layers=(12, 20), ffn_mults=(2.75,), X=(1, 4, 16),
                          G=(1, 4, 8), shared=(0, 1))


# ------------------------------------------------------------------------------------------------------
# LR
def test_vertex_lr_recovers_the_parabola_minimum_and_flags_edges():
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    best = 3e-3
    losses = [2.0 + 0.1 * (math.log(x) - math.log(best)) ** 2 for x in lrs]
    lr, edge = F.vertex_lr(lrs, losses)
    assert lr == pytest.approx(best, rel=1e-6) and not edge
    # monotone: the best is the largest swept LR, flagged as at the edge
    lr, edge = F.vertex_lr(lrs, [3.0, 2.9, 2.8, 2.7])
    assert lr == pytest.approx(8e-3) and edge
    # unordered input is sorted first; two LRs: the swept minimum
    lr, edge = F.vertex_lr([4e-3, 1e-3], [2.5, 2.6])
    assert lr == pytest.approx(4e-3) and edge


def _anchor(name, family, active, lr):
    return F.Anchor(name, family, active, [lr], [2.0], lr, False)


def test_vertex_lr_uses_the_minimum_and_its_neighbours():
    """Far LRs of an extended sweep do not bend the vertex: only the three points around the minimum count."""
    best = 5e-3
    lrs = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    losses = [2.0 + 0.1 * (math.log(x) - math.log(best)) ** 2 for x in lrs]
    losses[0] += 1.0  # a diverged far point
    lr, edge = F.vertex_lr(lrs, losses)
    assert lr == pytest.approx(best, rel=1e-6) and not edge


def test_lr_sweep_extends_past_an_edge_optimum():
    plan = V.make_plan(2048)
    base = {r.key for r in plan.anchors()}
    # d32 MoE still falling at its largest LR, d96 dense lowest at its smallest, the others interior (4e-3)
    shape = {"d32-X8-G4-s1": lambda x: -x, "d96-dense": lambda x: x}
    rows = {r.key: dict(val_loss=str(shape.get(r.arch.name, lambda x: (x - math.log(4e-3)) ** 2)(math.log(r.lr))))
            for r in plan.anchors()}
    added = V.extend_lr_sweep(plan, rows)
    assert [(r.arch.name, r.ratio, r.lr) for r in added] == [("d32-X8-G4-s1", 5.0, pytest.approx(3.2e-2)),
                                                             ("d96-dense", 5.0, pytest.approx(1e-3)),
                                                             ("d32-X8-G4-s1", 40.0, pytest.approx(3.2e-2))]
    assert added[2].key == "d32-X8-G4-s1-T40-lr0.032-s0"
    assert V.extend_lr_sweep(plan, rows) == []  # the added runs are not done yet
    k = [r for r in plan.runs if r.phase == "lr"]
    assert plan.runs[:len(k)] == k  # still before the grid, after their architecture's runs
    assert k[k.index(added[0]) - 1].key == "d32-X8-G4-s1-T5-lr0.016-s0"
    # the extension still improves -> one more; then the cap (MAX_LR_EXT) stops it
    rows[added[0].key] = dict(val_loss="-99")
    more = V.extend_lr_sweep(plan, rows)
    assert [(r.arch.name, r.lr) for r in more] == [("d32-X8-G4-s1", pytest.approx(6.4e-2))]
    rows[more[0].key] = dict(val_loss="-100")
    assert V.extend_lr_sweep(plan, rows) == []
    # re-planning from the rows rebuilds every extension in one call
    again = V.make_plan(2048, rows=rows)
    assert {r.key for r in again.anchors()} - base == {r.key for r in added + more}


def test_lr_rule_fit_is_log_linear_in_active_params_with_a_moe_offset():
    a, b, c = 1.0, -0.5, 0.3
    anchors = [_anchor(f"{f}{n}", f, n, math.exp(a + b * math.log(n) + c * (f == "moe")))
               for n in (1e5, 6e5) for f in ("dense", "moe")]
    rule = F.fit_lr_rule(anchors)
    assert (rule.a, rule.b, rule.c) == pytest.approx((a, b, c), abs=1e-9)
    assert rule.rms_log_resid < 1e-9 and rule.n == 4
    assert rule.lr(3e5, True) == pytest.approx(math.exp(a + b * math.log(3e5) + c))
    # one family only: no MoE term; one size only: no slope
    r1 = F.fit_lr_rule([x for x in anchors if x.family == "dense"])
    assert r1.c == 0.0 and r1.b == pytest.approx(b)
    r2 = F.fit_lr_rule([x for x in anchors if x.active == 1e5])
    assert r2.b == 0.0 and r2.c == pytest.approx(c)
    assert r1.d == 0.0 and "tokens/param" not in rule.describe()  # one duration: no duration term
    # a second duration at the small size identifies d
    d = -0.3
    long = [F.Anchor(x.arch, x.family, x.active, [1.0], [2.0], x.best_lr * 8.0 ** d, False, 40.0)
            for x in anchors if x.active == 1e5]
    r3 = F.fit_lr_rule([F.Anchor(x.arch, x.family, x.active, [1.0], [2.0], x.best_lr, False, 5.0)
                        for x in anchors] + long)
    assert (r3.a + d * math.log(5.0), r3.b, r3.c, r3.d) == pytest.approx((a, b, c, d), abs=1e-9)
    assert r3.lr(3e5, False, 40.0) / r3.lr(3e5, False, 5.0) == pytest.approx(8.0 ** d)
    assert "ln(tokens/param)" in r3.describe()
    # the MoE's own size slope: identified by two sizes in each family
    e = -0.4
    inter = [F.Anchor(x.arch, x.family, x.active, [1.0], [2.0],
                      x.best_lr * math.exp(e * math.log(x.active) * (x.family == "moe")), False) for x in anchors]
    r4 = F.fit_lr_rule(inter)
    assert (r4.a, r4.b, r4.c, r4.e) == pytest.approx((a, b, c, e), abs=1e-9) and r4.rms_log_resid < 1e-9
    assert r4.lr(3e5, True) == pytest.approx(math.exp(a + (b + e) * math.log(3e5) + c))
    assert abs(rule.e) < 1e-9 and "[moe] ln(active)" in r4.describe()


# ------------------------------------------------------------------------------------------------------
# the plan
def test_plan_grid_seeds_holdout_anchors_and_totals():
    plan = V.make_plan(2048)
    grid = [r for r in plan.runs if r.phase == "grid"]
    by_point: dict[str, list[int]] = {}
    for r in grid:
        by_point.setdefault(r.point, []).append(r.seed)
        assert r.lr is None  # the rule's
        if r.arch.family == "moe":
            cfg = plan.config(r.arch)
            assert (cfg.top_k + cfg.n_shared_experts) * cfg.expert_ffn_dim == cfg.ffn_dim
            assert cfg.router_score == "sigmoid" and cfg.n_experts / cfg.top_k == r.arch.X
    assert all(sorted(s) == [0, 1] for s in by_point.values())
    act = {r.point: count_params(plan.config(r.arch))[1] for r in grid}
    held = {r.point for r in grid if r.holdout}
    assert {r.arch.family for r in grid if r.holdout} == {"dense", "moe"}
    assert min(act[p] for p in held) > max(act[p] for p in act if p not in held)
    ratios = sorted({r.tokens / count_params(plan.config(r.arch))[1] for r in grid})
    assert ratios[0] < 3 and ratios[-1] > 39
    for axis in ("X", "G", "shared"):
        assert len({getattr(r.arch, axis) for r in grid if r.arch.d == 64 and r.arch.family == "moe"}) >= 2
    # anchors: smallest and largest fitted size, dense and MoE, >= 3 LRs each, never a held-out size
    anchors = plan.anchors()
    assert {(r.arch.d, r.arch.family) for r in anchors} == {(32, "dense"), (32, "moe"), (96, "dense"), (96, "moe")}
    assert all(len({r.lr for r in anchors if r.arch.name == n}) >= 3 for n in {r.arch.name for r in anchors})
    # plan totals: the sum of the per-run hours, and what is left shrinks by the done runs
    tok_s = {r.arch.name: 1000.0 for r in plan.runs}
    done = {plan.runs[0].key, plan.runs[-1].key}
    lines = V.plan_lines(plan, done, tok_s)
    total_h = sum(r.tokens for r in plan.runs) / 1000 / 3600
    left_h = total_h - sum(r.tokens for r in plan.runs if r.key in done) / 1000 / 3600
    assert lines[-1].startswith(f"total {len(plan.runs)} runs, {total_h:.1f} CPU hours ({left_h:.1f} left)")
    assert sum(ln.endswith(" done") for ln in lines) == 2
    with pytest.raises(V.ScalingError, match="seeds"):
        V.make_plan(2048, (0, 0))


# ------------------------------------------------------------------------------------------------------
# synthetic rows from a known law
FAKE_D = -0.2  # the synthetic optimum's duration exponent


def fake_best_lr(active, moe, ratio=5.0):
    """The synthetic optimum, inside every anchor's swept range: 4.8e-3 (d32) .. 3.1e-3 (d96) dense at 5 tokens
    per param, x1.2 MoE, x0.66 at 40 tokens per param."""
    return math.exp(-5.3 - 0.25 * math.log(active / 1e5) + 0.2 * moe + FAKE_D * math.log(ratio / 5.0))


def _fake_row(plan, run, lr, seed_noise=0.004, rng=None):
    from model.config import param_breakdown

    cfg = plan.config(run.arch)
    total, active = count_params(cfg)
    b = param_breakdown(cfg)
    nonemb = active - b["embedding"] - b["lm_head"]
    law = float(predict(TRUE, nonemb, run.tokens, run.arch.X, run.arch.G, run.arch.shared))
    best = fake_best_lr(active, run.arch.family == "moe", run.ratio)
    noise = (rng.normal(0, seed_noise) if rng is not None else 0.0)
    val = law * (1 + 0.02 * (math.log(lr) - math.log(best)) ** 2) * (1 + noise)
    return dict(key=run.key, phase=run.phase, point=run.point, family=run.arch.family, holdout=int(run.holdout),
                d_model=run.arch.d, n_layers=plan.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k,
                expert_ffn_dim=cfg.expert_ffn_dim, n_shared_experts=cfg.n_shared_experts, X=run.arch.X,
                G=run.arch.G, active_params=active, total_params=total, active_nonemb=nonemb, tokens=run.tokens,
                ratio=run.ratio, lr=f"{lr:.6g}", seed=run.seed, val_loss=f"{val:.6f}", train_loss="0",
                seconds="0", plan=plan.fingerprint())


def test_aggregate_averages_seeds_per_point():
    plan = V.make_plan(2048)
    rows = {}
    for r in plan.runs:
        if r.phase == "grid" and r.arch.name == "d64-dense" and r.ratio == 10:
            row = _fake_row(plan, r, 4e-3)
            row["val_loss"] = "3.0" if r.seed == 0 else "3.2"
            rows[r.key] = row
    (p,) = F.aggregate(rows)
    assert p.point == "d64-dense-T10" and p.losses == [3.0, 3.2]
    assert p.mean == pytest.approx(3.1) and p.sd == pytest.approx(math.sqrt(0.02))


def test_verdicts_exclude_or_contain_no_effect():
    base = dict(E0=1, A=1, alpha=0.3, beta=0.3, delta=0.2, rho=0.9, g=0.5, gamma=1.0, B=1)
    clear = [dict(base, alpha=0.3 + e, beta=0.3 + e, delta=0.2 + e, rho=0.9 + e, g=0.5 + e)
             for e in np.linspace(-0.05, 0.05, 41)]
    v = F.verdicts(base, clear)
    assert v["alpha"]["verdict"] == "loss falls with active params"
    assert v["delta"]["verdict"] == "sparsity helps"
    assert v["rho"]["verdict"] == "a shared expert helps"
    assert v["gran8"]["verdict"] == "finer experts help" and v["gran8"]["hi"] < 1
    vague = [dict(base, delta=e, rho=1 + e, g=math.exp(-8) if e > 0 else 0.5, alpha=0.3 + 10 * e)
             for e in np.linspace(-0.1, 0.1, 41)]
    v = F.verdicts(base, vague)
    for k in ("alpha", "delta", "rho", "gran8"):
        assert v[k]["verdict"].startswith("cannot resolve"), k
    v = F.verdicts(dict(base, delta=-0.2, rho=1.1), [dict(base, delta=-0.2 + e, rho=1.1 + e)
                                                   for e in np.linspace(-0.05, 0.05, 21)])
    assert v["delta"]["verdict"] == "sparsity hurts" and v["rho"]["verdict"] == "a shared expert hurts"


def _synthetic_rows(plan, noise=0.004):
    rng = np.random.default_rng(0)
    rows = {}
    for r in plan.anchors():
        rows[r.key] = _fake_row(plan, r, r.lr, rng=rng)
    lrs, rule = V.grid_lrs(plan, rows)
    assert rule is not None
    for r in plan.runs:
        if r.phase == "grid":
            rows[r.key] = _fake_row(plan, r, lrs[r.key][0], noise, rng)
            rows[r.key]["lr_source"] = "rule"
    return rows


def test_report_on_a_synthetic_sweep(tmp_path):
    plan = V.make_plan(2048)
    rows = _synthetic_rows(plan)
    V.write_rows(tmp_path / "s.csv", rows, [r.key for r in plan.runs])
    back = V.read_rows(tmp_path / "s.csv")
    assert set(back) == set(rows) and V.done_keys(plan, back) == set(rows)
    md = F.write_report(plan, back, tmp_path / "scaling_v2.md", n_boot=3, space=SMALL_SPACE,
                        starts=default_starts()[::32])
    text = md.read_text()
    for s in ("LR rule: `rule: ln lr", "| alpha | 0 |", "| gran8 | 1 |", "d128-dense-T10 | 2 |", "paper S:",
              "paper-like", "Moderate sparsity + fine-grained + shared at "):
        assert s in text, s
    assert "Not run yet" not in text
    for png in ("scaling_v2_lr.png", "scaling_v2_law.png"):
        assert f"]({png})" in text and (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # a person's interpretation between the NOTES markers survives the next regeneration
    md.write_text(text.replace("_(interpretation not written yet)_", "MoE wins at d96."))
    F.write_report(plan, back, md, n_boot=3, space=SMALL_SPACE, starts=default_starts()[::32])
    assert "MoE wins at d96." in md.read_text() and "interpretation not written yet" not in md.read_text()
    fit = json.loads((tmp_path / "scaling_v2_fit.json").read_text())
    assert fit["n_points"] == 28 and fit["n_runs"] == 56 and fit["n_boot"] == 3
    assert len(fit["heldout"]) == 2
    for h in fit["heldout"]:
        # the LR rule learned from the anchors puts the held-out points near their optimum: the law (fit on
        # points trained at the rule's LR) predicts them to well under 5%
        assert abs(h["rel_err"]) < 0.05
    assert fit["params"]["alpha"] == pytest.approx(TRUE.alpha, abs=0.1)
    assert fit["verdicts"]["alpha"]["verdict"] == "loss falls with active params"
    assert fit["verdicts"]["beta"]["verdict"] == "loss falls with tokens"
    # 6 anchors: d32 and d96 at 5 tokens/param, d32 again at 40; the duration term is recovered
    assert fit["lr_rule"]["n"] == 6 and len(fit["optimize"]) == 3
    assert fit["lr_rule"]["d"] == pytest.approx(FAKE_D, abs=0.1)
    # a partial sweep reports what it has
    part = {k: v for k, v in back.items() if v["phase"] == "lr"}
    text = F.write_report(plan, part, tmp_path / "p.md", n_boot=0, space=SMALL_SPACE).read_text()
    assert "Not fitted" in text and f"Not run yet ({len(plan.runs) - len(part)})" in text


# ------------------------------------------------------------------------------------------------------
# the runner: LR gating, resume, workers sharing the CSV
def test_sweep_resumes_row_by_row_gates_on_the_lr_rule_and_locks(tmp_path):
    plan = V.make_plan(2048)
    csv_path = tmp_path / "s.csv"
    seen = []
    rng = np.random.default_rng(1)

    def fake(plan, run, lr, data, runs_dir, log):
        seen.append((run.key, lr))
        return _fake_row(plan, run, lr, rng=rng)

    quiet = dict(log=lambda *_: None, execute_fn=fake)
    grid0 = next(r.key for r in plan.runs if r.phase == "grid")
    with pytest.raises(V.ScalingError, match="LR rule"):
        V.run_sweep(plan, None, csv_path, tmp_path / "runs", only={grid0}, **quiet)
    n0 = len(plan.anchors())
    V.run_sweep(plan, None, csv_path, tmp_path / "runs", limit=n0 + 3, **quiet)
    # the LR sweep (with any run its noise put past an edge, inserted into its sweep) and then the grid, in order
    assert len(plan.anchors()) <= n0 + 2
    assert [k for k, _ in seen] == [r.key for r in plan.runs[:n0 + 3]]
    rows = V.read_rows(csv_path)
    assert len(rows) == n0 + 3 and grid0 in rows
    g = rows[grid0]
    _, rule = V.grid_lrs(plan, rows)
    assert g["lr_source"] == rule.describe()
    assert float(g["lr"]) == pytest.approx(rule.lr(int(g["active_params"]), g["family"] == "moe",
                                                   float(g["ratio"])), rel=1e-5)
    # resume: nothing finished is retrained; a deleted row is the only one that runs
    rows.pop(grid0)
    V.write_rows(csv_path, rows, [r.key for r in plan.runs])
    seen.clear()
    V.run_sweep(plan, None, csv_path, tmp_path / "runs", only={grid0}, **quiet)
    assert [k for k, _ in seen] == [grid0]
    seen.clear()
    V.run_sweep(plan, None, csv_path, tmp_path / "runs", only={grid0}, **quiet)
    assert seen == []
    with pytest.raises(V.ScalingError, match="unknown run key"):
        V.run_sweep(plan, None, csv_path, tmp_path / "runs", only={"nope"}, **quiet)
    import fcntl

    # a second worker: it holds the next grid run (this one takes the one after), and finishes another run
    # while this one trains: its row is merged into the CSV, not overwritten
    todo = [r.key for r in plan.runs if r.key not in V.read_rows(csv_path)]
    other_key = todo[2]

    def fake_beside_other(plan, run, lr, data, runs_dir, log):
        r = V.read_rows(csv_path)
        o = next(x for x in plan.runs if x.key == other_key)
        r[other_key] = dict(_fake_row(plan, o, 1e-3, rng=rng), lr_source="rule")
        V.write_rows(csv_path, r, [x.key for x in plan.runs])
        return fake(plan, run, lr, data, runs_dir, log)

    seen.clear()
    with open(tmp_path / "runs" / "locks" / f"{todo[0]}.lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        V.run_sweep(plan, None, csv_path, tmp_path / "runs", limit=1, log=lambda *_: None,
                    execute_fn=fake_beside_other)
    assert [k for k, _ in seen] == [todo[1]]
    rows = V.read_rows(csv_path)
    assert todo[0] not in rows and todo[1] in rows and other_key in rows
    # rows of another plan are refused, never mixed in
    other = V.make_plan(4096)
    with pytest.raises(V.ScalingError, match="another plan"):
        V.done_keys(other, V.read_rows(csv_path))


def test_micro_run_end_to_end(tmp_path):
    """One LR-sweep pair and one grid point at the rule's LR on a real (tiny) corpus, with the real trainer."""
    from tests.test_claims import _fake_site
    from train import corpus as K

    site = tmp_path / "site"
    site.mkdir()
    _fake_site(site, n=300)
    s = K.build(tmp_path / "corpus", sites=[site], max_mb=1.0, shakespeare=None, heldout_permille=150,
                vocab_size=320, log=lambda *_: None)
    plan = V.Plan(s["vocab_size"], n_layers=1, seq_len=16, batch=4, eval_windows=8)
    a = V.arch(32, 4, 4, 1)
    for lr in (2e-3, 8e-3):
        plan.runs.append(V.Run(f"{a.name}-lr{lr:g}-s0", "lr", a, 1.0, 24 * 64, 24, 0, lr))
    plan.runs.append(V.Run(f"{a.name}-T1-s0", "grid", a, 1.0, 20 * 64, 20, 0, None))
    out = tmp_path / "s.csv"
    rows = V.run_sweep(plan, tmp_path / "corpus", out, tmp_path / "runs", log=lambda *_: None)
    assert len(rows) == 3
    for r in rows.values():
        assert 0 < float(r["val_loss"]) < math.log(plan.vocab) + 1
        assert float(r["load_max_mean"]) >= 1.0
        assert not (tmp_path / "runs" / r["key"] / "ckpt").exists()
    g = rows[f"{a.name}-T1-s0"]
    # two swept LRs, one anchor: the rule is the better of the two
    best = min((rows[f"{a.name}-lr{lr:g}-s0"] for lr in (2e-3, 8e-3)), key=lambda r: float(r["val_loss"]))
    assert g["lr_source"].startswith("rule") and float(g["lr"]) == pytest.approx(float(best["lr"]), rel=1e-5)


def test_cli_bad_input(capsys, tmp_path):
    from model.cli import run

    assert run(V.main, ["--plan", "--seeds", "a,b", "--csv", str(tmp_path / "x.csv")]) == 2
    assert "--seeds" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert run(V.main, ["--plan", "--csv", str(bad)]) == 2
    assert "not a scaling_v2 CSV" in capsys.readouterr().err


def test_cli_plan_lists_every_run(capsys, tmp_path):
    assert V.main(["--plan", "--csv", str(tmp_path / "none.csv"), "--corpus", str(tmp_path / "no-corpus")]) == 0
    out = capsys.readouterr().out
    plan = V.make_plan(2048)
    assert f"total {len(plan.runs)} runs" in out
    assert all(r.key in out for r in plan.runs)


def test_workers_wait_for_the_lr_sweep_and_take_its_extensions(tmp_path):
    """Another worker holds an LR-sweep run: this one runs the rest of the sweep, waits (no grid run starts
    from a partial sweep), then re-plans from that run's loss: an edge optimum adds runs past the edge (two at
    most), and the grid's LR comes from the extended sweep."""
    import fcntl
    import threading
    import time

    plan = V.make_plan(2048, anchor_lrs={32: (2e-3, 4e-3)}, long_anchor=None)
    csv_path, runs = tmp_path / "s.csv", tmp_path / "runs"
    held_key = "d32-X8-G4-s1-T5-lr0.004-s0"
    seen = []

    def fake(plan, run, lr, data, runs_dir, log):
        seen.append(run.key)
        row = _fake_row(plan, run, lr)
        if run.phase == "lr" and run.arch.family == "moe":  # MoE loss still falling at every swept LR
            row["val_loss"] = f"{5.0 - math.log(lr):.6f}"
        return row

    (runs / "locks").mkdir(parents=True)
    lock = open(runs / "locks" / f"{held_key}.lock", "w")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    t = threading.Thread(target=V.run_sweep, args=(plan, None, csv_path, runs),
                         kwargs=dict(limit=7, log=lambda *_: None, execute_fn=fake, poll_s=0.01), daemon=True)
    t.start()
    deadline = time.time() + 60  # a loaded CI machine: wait for the condition, not a fixed time
    while len(seen) < 4 and time.time() < deadline:
        time.sleep(0.01)
    t.join(0.5)  # it must now be waiting: nothing more may start
    # dense: lowest at 4e-3, the base sweep's edge -> 8e-3 added, interior; then it waits for the held run
    assert t.is_alive() and seen == ["d32-dense-T5-lr0.002-s0", "d32-dense-T5-lr0.004-s0",
                                     "d32-dense-T5-lr0.008-s0", "d32-X8-G4-s1-T5-lr0.002-s0"]
    held_run = next(r for r in plan.runs if r.key == held_key)
    rows = V.read_rows(csv_path)
    rows[held_key] = dict(fake(plan, held_run, 4e-3, None, runs, None), lr_source="sweep")
    seen.pop()
    V.write_rows(csv_path, rows, [r.key for r in plan.runs])
    lock.close()  # the other worker is done
    t.join(10)
    assert not t.is_alive()
    assert seen[4:] == ["d32-X8-G4-s1-T5-lr0.008-s0", "d32-X8-G4-s1-T5-lr0.016-s0", "d128-dense-T10-s0"]
    rows = V.read_rows(csv_path)
    assert float(rows["d128-dense-T10-s0"]["lr"]) > 0
    replanned = V.make_plan(2048, anchor_lrs={32: (2e-3, 4e-3)}, long_anchor=None, rows=rows)
    best = {a.arch: a.best_lr for a in F.anchor_best_lrs(replanned, rows)}
    assert best["d32-X8-G4-s1"] == pytest.approx(1.6e-2)  # the extended edge, not the base sweep's 4e-3
