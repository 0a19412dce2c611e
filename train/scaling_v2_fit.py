"""The v2 sweep's analysis: anchor LRs and the LR rule, seed aggregation, the law fit with a two-level
bootstrap (points, then seeds within a point), per-constant verdicts, held-out errors, the optimizer at the
paper's phone budgets, and the report (bench/results/scaling.md + scaling_v2_fit.json + the figures of train/scaling_v2_plot.py).

Verdicts ("no effect" value in brackets; an interval is the bootstrap's 2.5-97.5 percentiles):
    alpha [0]   loss falls with active params: lo > 0
    beta  [0]   loss falls with tokens: lo > 0
    delta [0]   sparsity: lo > 0 helps, hi < 0 hurts
    rho   [1]   a shared expert: hi < 1 helps, lo > 1 hurts
    gran8 [1]   granularity, as the parameter-term factor of G=8 over G=1, (1 + g 8^-gamma) / (1 + g): hi < 0.999
                helps (the law's g floor e^-8 reads as ~0.9997; the form cannot express "finer hurts")
otherwise: "cannot resolve". E0, A, B get intervals, no verdict.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.config import count_params, flops_per_token, get_config, int4_weight_bytes, kv_cache_bytes

GRAN_G = 8.0
GRAN_TOL = 1e-3


# ------------------------------------------------------------------------------------------------------
# LR: anchors and the rule
def vertex_lr(lrs, losses) -> tuple[float, bool]:
    """The LR minimising the parabola in log LR through the swept minimum and its two neighbours; (lr,
    at_edge). A parabola through every point would let far-off LRs (a sweep extended past an edge spans
    five octaves) bend the vertex. Falls back to the swept minimum (at_edge when it is the smallest or
    largest LR) when the minimum is at an edge, fewer than 3 LRs were swept, or the three points are not
    convex."""
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    o = np.argsort(x)
    x, y = x[o], y[o]
    i = int(np.argmin(y))
    edge = i in (0, len(x) - 1)
    if len(x) >= 3 and not edge:
        c2, c1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
        if c2 > 0:
            v = -c1 / (2 * c2)
            if x[i - 1] <= v <= x[i + 1]:
                return float(math.exp(v)), False
    return float(math.exp(x[i])), edge


@dataclass
class Anchor:
    arch: str
    family: str
    active: int
    lrs: list
    losses: list
    best_lr: float
    at_edge: bool
    ratio: float = 5.0  # tokens per active param of the sweep


def anchor_best_lrs(plan, rows: dict[str, dict]) -> list[Anchor]:
    """Per anchor (architecture, tokens per param), its best LR from the finished LR-sweep rows (seeds averaged
    per LR)."""
    out = []
    for runs in plan.lr_sweeps().values():
        d: dict[float, list[float]] = {}
        for r in runs:
            if r.key in rows:
                d.setdefault(float(r.lr), []).append(float(rows[r.key]["val_loss"]))
        if not d:
            continue
        lrs = sorted(d)
        losses = [float(np.mean(d[lr])) for lr in lrs]
        best, edge = vertex_lr(lrs, losses)
        a = runs[0].arch
        _, act = count_params(plan.config(a))
        out.append(Anchor(a.name, a.family, act, lrs, losses, best, edge, runs[0].ratio))
    return out


@dataclass
class LRRule:
    """log LR = a + b log(active params) + c [MoE] + d log(tokens per active param) + e [MoE] log(active
    params): the MoE's own size slope b + e (measured: the MoE's best LR falls faster with size than dense's)."""
    a: float
    b: float
    c: float
    n: int
    rms_log_resid: float
    d: float = 0.0
    e: float = 0.0

    def lr(self, active: float, moe: bool, ratio: float = 1.0) -> float:
        la = math.log(active)
        return float(math.exp(self.a + self.b * la + self.c * float(moe) + self.d * math.log(ratio)
                              + self.e * float(moe) * la))

    def describe(self) -> str:
        return (f"rule: ln lr = {self.a:.4f} {self.b:+.4f} ln(active) {self.c:+.4f} [moe]"
                + (f" {self.d:+.4f} ln(tokens/param)" if self.d else "")
                + (f" {self.e:+.4f} [moe] ln(active)" if self.e else ""))


def fit_lr_rule(anchors: list[Anchor]) -> LRRule:
    """Least squares of log best LR on log active params, a MoE indicator and log tokens per param (the
    optimum falls with a longer run); a term the anchors cannot identify (one size, one family, one duration) is
    left out (0); the MoE slope term only when both families were swept at two or more sizes."""
    if not anchors:
        raise ValueError("fit_lr_rule: no anchors")
    y = np.log([a.best_lr for a in anchors])
    cols = [np.ones(len(anchors))]
    names = ["a"]
    la = np.log([a.active for a in anchors])
    moe = np.array([a.family == "moe" for a in anchors], dtype=np.float64)
    if np.ptp(la) > 0.05:
        cols.append(la)
        names.append("b")
    if 0 < moe.sum() < len(moe):
        cols.append(moe)
        names.append("c")
    lt = np.log([a.ratio for a in anchors])
    if np.ptp(lt) > 0.05:
        cols.append(lt)
        names.append("d")
    if "b" in names and "c" in names and all(np.ptp(la[moe == f]) > 0.05 for f in (0.0, 1.0)):
        cols.append(la * moe)
        names.append("e")
    M = np.stack(cols, 1)
    coef, *_ = np.linalg.lstsq(M, y, rcond=None)
    c = dict(zip(names, coef))
    resid = y - M @ coef
    return LRRule(float(c["a"]), float(c.get("b", 0.0)), float(c.get("c", 0.0)), len(anchors),
                  float(np.sqrt(np.mean(resid ** 2))), float(c.get("d", 0.0)), float(c.get("e", 0.0)))


# ------------------------------------------------------------------------------------------------------
# seeds -> points
@dataclass
class Point:
    point: str
    holdout: bool
    N: float        # active non-embedding params
    D: float        # tokens
    X: float
    G: float
    S: float
    losses: list    # one per seed
    lr: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def sd(self) -> float:
        return float(np.std(self.losses, ddof=1)) if len(self.losses) > 1 else float("nan")


def aggregate(rows: dict[str, dict]) -> list[Point]:
    """Grid rows grouped by point (every field but the seed), in first-seen order."""
    pts: dict[str, Point] = {}
    for r in rows.values():
        if r["phase"] != "grid":
            continue
        p = pts.get(r["point"])
        if p is None:
            p = pts[r["point"]] = Point(r["point"], str(r["holdout"]) in ("1", "True"), float(r["active_nonemb"]),
                                        float(r["tokens"]), float(r["X"]), float(r["G"]),
                                        float(r["n_shared_experts"]), [], float(r["lr"]))
        p.losses.append(float(r["val_loss"]))
    return list(pts.values())


def _arrays(pts: list[Point], losses=None):
    N, D, X, G, S = (np.array([getattr(p, k) for p in pts]) for k in ("N", "D", "X", "G", "S"))
    y = np.array([p.mean for p in pts]) if losses is None else np.asarray(losses)
    return N, D, X, G, S, y


def gran_factor(g: float, gamma: float, G: float = GRAN_G) -> float:
    return (1 + g * G ** -gamma) / (1 + g)


def verdicts(params: dict, samples: list[dict]) -> dict[str, dict]:
    def ci(vals):
        return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))

    out = {}
    gran = [gran_factor(s["g"], s["gamma"]) for s in samples]
    spec = [("alpha", 0.0, "loss falls with active params", None), ("beta", 0.0, "loss falls with tokens", None),
            ("delta", 0.0, "sparsity helps", "sparsity hurts"), ("rho", 1.0, "a shared expert hurts", "a shared expert helps"),
            ("gran8", 1.0 - GRAN_TOL, None, "finer experts help")]
    for k, v0, above, below in spec:
        vals = gran if k == "gran8" else [s[k] for s in samples]
        value = gran_factor(params["g"], params["gamma"]) if k == "gran8" else params[k]
        lo, hi = ci(vals) if vals else (float("nan"), float("nan"))
        if k == "alpha" or k == "beta":
            v = above if lo > v0 else None
        elif k == "gran8":
            v = below if hi < v0 else None
        else:
            v = above if lo > v0 else below if hi < v0 else None
        out[k] = dict(value=value, lo=lo, hi=hi, no_effect=1.0 if k == "gran8" else v0,
                      verdict=v or "cannot resolve (the interval contains no effect)")
    return out


def fit_points(pts: list[Point], n_boot: int = 200, seed: int = 0, starts=None) -> dict:
    """Fit the law to the seed means of the non-held-out points; two-level bootstrap for the intervals;
    predictions for the held-out points."""
    from train.scaling_law import default_starts, fit_law, predict  # noqa: PLC0415

    fit_pts = [p for p in pts if not p.holdout]
    held = [p for p in pts if p.holdout]
    N, D, X, G, S, y = _arrays(fit_pts)
    fix_shared = bool((S > 0).min() == (S > 0).max())
    res = fit_law(N, D, X, G, S, y, starts=starts or default_starts(), n_boot=0, fix_shared=fix_shared)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(fit_pts), len(fit_pts))
        # a resampled point's loss is the mean of its seeds drawn with replacement: seed noise enters too
        yb = [float(np.mean(rng.choice(fit_pts[i].losses, len(fit_pts[i].losses)))) for i in idx]
        b = fit_law(N[idx], D[idx], X[idx], G[idx], S[idx], yb, starts=res.top_starts, n_boot=0, fix_shared=fix_shared)
        samples.append(b.params.as_dict())
    p = res.params
    params = p.as_dict()
    pred = predict(p, N, D, X, G, S)
    out = dict(params=params, n_points=len(fit_pts), n_runs=sum(len(q.losses) for q in fit_pts), n_boot=n_boot,
               ci95={k: (float(np.percentile([s[k] for s in samples], 2.5)),
                         float(np.percentile([s[k] for s in samples], 97.5))) for k in params} if samples else {},
               verdicts=verdicts(params, samples) if samples else {},
               train_rmse_rel=float(np.sqrt(np.mean((pred / y - 1) ** 2))),
               points=[dict(point=q.point, holdout=False, mean=q.mean, sd=q.sd, n=len(q.losses), lr=q.lr,
                            predicted=float(v)) for q, v in zip(fit_pts, pred)],
               heldout=[])
    if held:
        Nh, Dh, Xh, Gh, Sh, yh = _arrays(held)
        ph = predict(p, Nh, Dh, Xh, Gh, Sh)
        out["heldout"] = [dict(point=q.point, holdout=True, mean=q.mean, sd=q.sd, n=len(q.losses), lr=q.lr,
                               predicted=float(v), rel_err=float(v / q.mean - 1)) for q, v in zip(held, ph)]
    return out


# ------------------------------------------------------------------------------------------------------
# the optimizer at the paper's phone budgets
def paper_budgets(context: int = 2048) -> list[dict]:
    """The paper's S/M/L as budgets: memory = its INT4 weights + fp16 KV at `context`, compute = its forward
    FLOPs per token at `context` (our presets of the published shapes, model.config)."""
    out = []
    for name in ("S", "M", "L"):
        cfg = get_config(name)
        mem = int4_weight_bytes(cfg)["total"] + kv_cache_bytes(cfg, context)
        fl = flops_per_token(cfg, context)
        out.append(dict(label=f"paper {name}: {mem / 1e9:.2f} GB, {fl / 1e9:.2f} GFLOPs/token @{context}",
                        preset=name, memory_gb=mem / 1e9, active_flops=float(fl), context=context))
    return out


def paper_like(X: float, G: float, shared: int) -> bool:
    """The paper's shape class: moderate sparsity (4 <= X <= 32; the paper's 60 routed / top-4 is X = 15),
    fine-grained experts (G >= 4) and a shared expert."""
    return 4 <= X <= 32 and G >= 4 and shared >= 1


def optimize_budgets(params: dict, budgets: list[dict], space=None, tokens: float = 6e12) -> list[dict]:
    from train.scaling_law import LawParams  # noqa: PLC0415
    from train.scaling_opt import Budget, optimize  # noqa: PLC0415

    p = LawParams(**params)
    out = []
    for b in budgets:
        budget = Budget(memory_bytes=b["memory_gb"] * 1e9, context=b["context"], active_flops=b["active_flops"],
                        tokens=tokens)
        best, _front, cands = optimize(p, budget, space)
        dense = [c for c in cands if c.X == 1 and c.memory_bytes <= budget.memory_bytes]
        row = dict(budget=b, best=best.summary() if best else None,
                   best_dense_loss=min(c.loss for c in dense) if dense else None)
        if best:
            row["paper_like"] = paper_like(best.X, best.G, best.shared)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------
# report
def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_report(plan, rows: dict[str, dict], md_path, n_boot: int = 200, space=None, budgets=None,
                 starts=None, fit_name: str = "scaling_v2_fit.json") -> Path:
    """The report (bench/results/scaling.md), its fit JSON and the two figures beside it from the finished rows (a
    partial sweep reports what it has and says what is missing). The interpretation between the NOTES markers is
    a person's and survives a regeneration."""
    from train.scaling_report import NOTES_BEGIN, NOTES_END  # noqa: PLC0415
    from train.scaling_v2_plot import LAW_PNG, LR_PNG, plot_law, plot_lr  # noqa: PLC0415

    md_path = Path(md_path)
    notes = ""
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) + len(NOTES_BEGIN):old.index(NOTES_END)].strip()
    anchors = anchor_best_lrs(plan, rows)
    rule = fit_lr_rule(anchors) if anchors else None
    pts = aggregate(rows)
    n_grid = sum(r.phase == "grid" for r in plan.runs)
    n_grid_done = sum(r.phase == "grid" and r.key in rows for r in plan.runs)
    L = ["# On-device MoE scaling law, v2: offline BPE corpus, per-point LR, seeds", "",
         "Generated by `python -m train.scaling_v2 --report` from the CSV rows (train/scaling_v2.py has the grid, "
         f"train/scaling_v2_fit.py the analysis). Loss = held-out nats/token (BPE {plan.vocab}), {plan.eval_windows} "
         f"windows of {plan.seq_len}. Runs done: {len(rows)} of {len(plan.runs)} "
         f"(LR sweep {sum(r.key in rows for r in plan.anchors())} of {len(plan.anchors())}, grid {n_grid_done} of "
         f"{n_grid}). The v1 law (byte-level Shakespeare, one seed, one LR per size) is in "
         "[scaling_v1.md](scaling_v1.md).", "", "## Learning rate", "",
         "| anchor | active | tokens/param | LRs | losses | best LR |", "|---|---|---|---|---|---|"]
    for a in anchors:
        L.append(f"| {a.arch} | {a.active:,} | {a.ratio:g} | {', '.join(f'{x:.1e}' for x in a.lrs)} | "
                 f"{', '.join(f'{x:.4f}' for x in a.losses)} | {a.best_lr:.2e}{' (edge of range)' if a.at_edge else ''} |")
    n_arch = len(plan.lr_sweeps())
    partial = "" if all(r.key in rows for r in plan.anchors()) else \
        " Provisional: LR-sweep runs are missing, and the grid runs only once all are done."
    L += ["", f"LR rule: `{rule.describe()}` over {rule.n} of {n_arch} anchors, rms log residual "
          f"{rule.rms_log_resid:.3f}.{partial}" if rule else "LR rule: no anchors finished yet.", ""]
    if anchors:
        plot_lr(anchors, rule, md_path.with_name(LR_PNG))
        L += [f"![LR sweeps]({LR_PNG})", ""]
    fit = None
    fit_pts = [p for p in pts if not p.holdout]
    if len(fit_pts) >= 9:
        fit = fit_points(pts, n_boot=n_boot, starts=starts)
    if fit is None:
        L += ["## Fit", "", f"Not fitted: {len(fit_pts)} finished non-held-out points (need >= 9 for 9 constants).", ""]
    else:
        L += ["## Points (seed means)", "", "| point | held | seeds | LR | mean loss | sd | law | error |",
              "|---|---|---|---|---|---|---|---|"]
        for q in fit["points"] + fit["heldout"]:
            L.append(f"| {q['point']} | {'**held**' if q['holdout'] else 'fit'} | {q['n']} | {q['lr']:.2e} | "
                     f"{q['mean']:.4f} | {q['sd']:.4f} | {q['predicted']:.4f} | {(q['predicted'] / q['mean'] - 1) * 100:+.2f}% |")
        L += ["", "## Fitted law", "",
              "`L = E0 + A N^-alpha X^-delta rho^[s>0] (1 + g G^-gamma) + B D^-beta` (N active non-embedding / 1e6, "
              f"D tokens / 1e6), fit on {fit['n_points']} point means ({fit['n_runs']} runs), Huber on log residuals; "
              f"{fit['n_boot']} two-level bootstrap refits (points, then seeds within a point). Relative RMSE on the "
              f"fit points {fit['train_rmse_rel'] * 100:.2f}%.", "", "| constant | value | 95% CI |", "|---|---|---|"]
        for k, v in fit["params"].items():
            lo, hi = fit["ci95"].get(k, (float("nan"), float("nan")))
            L.append(f"| {k} | {v:.4g} | [{lo:.4g}, {hi:.4g}] |")
        L += ["", "| effect | no effect | value | 95% CI | verdict |", "|---|---|---|---|---|"]
        for k, v in fit["verdicts"].items():
            L.append(f"| {k} | {v['no_effect']:g} | {v['value']:.4g} | [{v['lo']:.4g}, {v['hi']:.4g}] | {v['verdict']} |")
        unresolved = [k for k, v in fit["verdicts"].items() if v["verdict"].startswith("cannot")]
        L += ["", f"The data cannot resolve: {', '.join(unresolved)}." if unresolved else
              "Every effect's interval excludes no effect.", "", "## Held-out (largest dense and MoE, not in the fit)", "",
              "| point | seeds | measured | predicted | error | < 5% |", "|---|---|---|---|---|---|"]
        for h in fit["heldout"]:
            L.append(f"| {h['point']} | {h['n']} | {h['mean']:.4f} | {h['predicted']:.4f} | {h['rel_err'] * 100:+.2f}% | "
                     f"{'yes' if abs(h['rel_err']) < 0.05 else 'no'} |")
        if not fit["heldout"]:
            L.append("| (no held-out point finished) | | | | | |")
        opt = optimize_budgets(fit["params"], budgets or paper_budgets(), space)
        fit["optimize"] = opt
        L += ["", "## Optimizer at the paper's phone budgets", "",
              "Budgets = the paper's S/M/L (model.config presets of the published shapes): memory = INT4 g32 weights + "
              "fp16 KV at 2k, compute = forward FLOPs/token at 2k; D = 6e12 tokens; train.scaling_opt's search space. "
              "Paper-like = 4 <= X <= 32, G >= 4, >= 1 shared expert. The law is fitted at d <= 96 on a BPE-2048 "
              "corpus: at phone scale this is an extrapolation of its shape terms, not a loss forecast.", "",
              "| budget | X | G | shared | E / k | d x L | active | pred. loss | best dense | paper-like |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for o in opt:
            s = o["best"]
            if s is None:
                L.append(f"| {o['budget']['label']} | none fits | | | | | | | | |")
                continue
            bd = f"{o['best_dense_loss']:.4f}" if o["best_dense_loss"] is not None else "-"
            L.append(f"| {o['budget']['label']} | {s['X']:g} | {s['G']:g} | {s['n_shared_experts']} | "
                     f"{s['n_experts']} / {s['top_k']} | {s['d_model']} x {s['n_layers']} | "
                     f"{s['active_params'] / 1e6:.0f}M | {s['predicted_loss']:.4f} | {bd} | "
                     f"{'yes' if o['paper_like'] else 'no'} |")
        picked = [o for o in opt if o["best"] is not None]
        L += ["", f"Moderate sparsity + fine-grained + shared at {sum(o['paper_like'] for o in picked)} of "
              f"{len(picked)} budgets with a feasible architecture"
              + (f" ({len(opt) - len(picked)} with none)." if len(picked) < len(opt) else ".")]
        plot_law(pts, fit["params"], md_path.with_name(LAW_PNG))
        L += ["", f"![the law against the points]({LAW_PNG})"]
        fit["lr_rule"] = asdict(rule) if rule else None
        _atomic_text(md_path.with_name(fit_name), json.dumps(fit, indent=1) + "\n")
    L += ["", "## What the data says", "", NOTES_BEGIN, notes or "_(interpretation not written yet)_", NOTES_END]
    missing = [r.key for r in plan.runs if r.key not in rows]
    if missing:
        L += ["", f"## Not run yet ({len(missing)})", "", ", ".join(missing[:40]) + (" ..." if len(missing) > 40 else "")]
    _atomic_text(md_path, "\n".join(L) + "\n")
    return md_path
