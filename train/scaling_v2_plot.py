"""The v2 scaling report's figures (PNG), from the anchors, the LR rule, the seed-mean points and the fit.

    scaling_v2_lr.png    one panel per LR sweep: loss vs LR, the vertex optimum and the rule's LR there
    scaling_v2_law.png   loss vs active params (T=10), vs tokens, predicted vs measured with the +-5% band;
                         sparsity, granularity with/without a shared expert at d64; each point's error

Seeds are drawn as dots, their mean with a +-1 sd bar; curves are the fitted law, not a smoothing.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

from train.scaling_law import LawParams, predict

LR_PNG, LAW_PNG = "scaling_v2_lr.png", "scaling_v2_law.png"
FAMILY_COLOR = {"dense": "tab:blue", "moe": "tab:red"}
MOE_REF = (8.0, 4.0, 1.0)  # the ladder's MoE shape: X, G, shared


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _d(point: str) -> int:
    m = re.match(r"d(\d+)-", point)
    return int(m.group(1)) if m else -1


def _ratio(point: str) -> float:
    m = re.search(r"-T([0-9.]+)$", point)
    return float(m.group(1)) if m else float("nan")


def plot_lr(anchors, rule, path: Path) -> Path:
    plt = _plt()
    n = max(1, len(anchors))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, a in zip(axes.flat, anchors):
        c = FAMILY_COLOR.get(a.family, "k")
        ax.plot(a.lrs, a.losses, "o-", color=c)
        ax.axvline(a.best_lr, color=c, ls=":", label=f"vertex {a.best_lr:.2e}" + (" (edge)" if a.at_edge else ""))
        if rule is not None:
            r = rule.lr(a.active, a.family == "moe", a.ratio)
            ax.axvline(r, color="k", ls="--", lw=1, label=f"rule {r:.2e}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _pos: f"{v:.2g}"))
        ax.set_title(f"{a.arch}, {a.ratio:g} tokens/param", fontsize=9)
        ax.set_xlabel("peak LR")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("LR sweeps: the grid trains each point at the rule's LR", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _seeds(ax, xs, pts, color, marker="o", label=None):
    """Seed dots, mean +- sd bars; held-out points starred."""
    for x, p in zip(xs, pts):
        ax.scatter([x] * len(p.losses), p.losses, color=color, s=10, alpha=0.5, zorder=3)
        ax.errorbar([x], [p.mean], yerr=[p.sd if len(p.losses) > 1 else 0.0], color=color, zorder=4,
                    marker="*" if p.holdout else marker, ms=13 if p.holdout else 6, mec="k" if p.holdout else color,
                    capsize=3, ls="none", label=label)
        label = None


def _law(p: LawParams, N, D, X, G, S):
    N = np.asarray(N, dtype=float)
    return predict(p, N, np.asarray(D, dtype=float) * np.ones_like(N), X * np.ones_like(N), G * np.ones_like(N),
                   S * np.ones_like(N))


def plot_law(pts, params: dict, path: Path, d_axes: int = 64, ratio_ladder: float = 10.0) -> Path:
    plt = _plt()
    p = LawParams(**params)
    fig, ((a1, a2, a4), (a3, a5, a6)) = plt.subplots(2, 3, figsize=(15, 8.4))
    # (1) active-params ladder at the ladder's tokens/param: dense and the MoE reference shape
    for fam, (X, G, S) in (("dense", (1.0, 1.0, 0.0)), ("moe", MOE_REF)):
        lad = sorted([q for q in pts if (q.X, q.G, q.S) == (X, G, S) and _ratio(q.point) == ratio_ladder],
                     key=lambda q: q.N)
        if not lad:
            continue
        c = FAMILY_COLOR[fam]
        N = np.array([q.N for q in lad])
        D = np.array([q.D for q in lad])
        _seeds(a1, N, lad, c, label="dense" if fam == "dense" else "MoE X=8 G=4 +1 shared")
        coef = np.polyfit(np.log(N), np.log(D), 1) if len(N) > 1 else (1.0, float(np.log(D[0] / N[0])))
        Ng = np.geomspace(N.min() / 1.3, N.max() * 1.3, 60)
        a1.plot(Ng, _law(p, Ng, np.exp(np.polyval(coef, np.log(Ng))), X, G, S), color=c)
    a1.set_xscale("log")
    a1.set_xlabel("active non-embedding params N")
    a1.set_ylabel("held-out loss (nats/token)")
    a1.set_title(f"Active size at {ratio_ladder:g} tokens/param (stars: held out)", fontsize=9)
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    # (2) tokens at fixed size: every (d, shape) with several durations
    groups: dict[tuple, list] = {}
    for q in pts:
        groups.setdefault((_d(q.point), q.X, q.G, q.S), []).append(q)
    style_by_d = {32: ("-", "o"), 64: ("--", "s"), 96: ("-.", "^"), 128: (":", "D")}
    for (d, X, G, S), qs in sorted(groups.items()):
        if len({q.D for q in qs}) < 3:
            continue
        qs = sorted(qs, key=lambda q: q.D)
        fam = "dense" if X == 1 else "moe"
        c = FAMILY_COLOR[fam]
        Dv = np.array([q.D for q in qs])
        ls, mk = style_by_d.get(d, ("-", "o"))
        _seeds(a2, Dv, qs, c, marker=mk, label=f"d{d} {fam}")
        Dg = np.geomspace(Dv.min() / 1.3, Dv.max() * 1.3, 60)
        a2.plot(Dg, _law(p, np.full_like(Dg, np.mean([q.N for q in qs])), Dg, X, G, S), color=c, ls=ls)
    a2.set_xscale("log")
    a2.set_xlabel("training tokens D")
    a2.set_title("Tokens at fixed size", fontsize=9)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    # (3, 4) the d64 shape axes at the ladder's duration: sparsity at G=4 +shared, granularity at X=8 with/without
    at = [q for q in pts if _d(q.point) == d_axes and _ratio(q.point) == ratio_ladder]
    ref = next((q for q in at if (q.X, q.G, q.S) == MOE_REF), None)
    if ref is not None:
        sp = sorted([q for q in at if q.X == 1 or (q.G, q.S) == MOE_REF[1:]], key=lambda q: q.X)
        _seeds(a3, [q.X for q in sp], sp, "tab:red", label="G=4, 1 shared (X=1: dense)")
        Xg = np.geomspace(1, 32, 50)
        a3.plot(Xg, [float(_law(p, [ref.N], ref.D, x, 4.0, 1.0)[0]) for x in Xg], color="tab:red")
        a3.set_xscale("log", base=2)
        a3.set_xlabel("sparsity X = experts / top-k")
        a3.set_ylabel("held-out loss (nats/token)")
        a3.set_title(f"Sparsity at d{d_axes}, {ratio_ladder:g} tokens/param", fontsize=9)
        for s, c in ((0.0, "tab:blue"), (1.0, "tab:green")):
            gr = sorted([q for q in at if q.X == 8 and q.S == s], key=lambda q: q.G)
            if not gr:
                continue
            _seeds(a5, [q.G for q in gr], gr, c, label=f"X=8, {'1 shared' if s else 'no shared'}")
            Gg = np.geomspace(1, 8, 30)
            a5.plot(Gg, [float(_law(p, [ref.N], ref.D, 8.0, g, s)[0]) for g in Gg], color=c)
        a5.set_xscale("log", base=2)
        a5.set_xlabel("granularity G = dense FFN / expert FFN")
        a5.set_title(f"Granularity and the shared expert at d{d_axes}", fontsize=9)
        for ax in (a3, a5):
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    else:
        a3.axis("off")
        a5.axis("off")
    # (4) parity
    meas = np.array([q.mean for q in pts])
    pred = np.array([float(_law(p, [q.N], q.D, q.X, q.G, q.S)[0]) for q in pts])
    held = np.array([q.holdout for q in pts])
    lo, hi = float(min(meas.min(), pred.min())) * 0.97, float(max(meas.max(), pred.max())) * 1.03
    g = np.linspace(lo, hi, 10)
    a4.plot(g, g, color="k", lw=1)
    a4.fill_between(g, g * 0.95, g * 1.05, color="gray", alpha=0.2, label="+-5%")
    fam = np.array(["dense" if q.X == 1 else "moe" for q in pts])
    for f, c in FAMILY_COLOR.items():
        m = (fam == f) & ~held
        a4.scatter(meas[m], pred[m], color=c, s=18, label=f"{f} (fit)")
        m = (fam == f) & held
        if m.any():
            a4.scatter(meas[m], pred[m], color=c, marker="*", s=160, edgecolor="k", label=f"{f} (held out)")
    a4.set_xlabel("measured (seed mean)")
    a4.set_ylabel("law")
    a4.set_title("Predicted vs measured", fontsize=9)
    a4.legend(fontsize=7)
    a4.grid(alpha=0.3)
    # (6) every point's error, sorted
    err = (pred / meas - 1) * 100
    order = np.argsort(err)
    a6.barh(range(len(pts)), err[order], color=[("k" if held[i] else FAMILY_COLOR[fam[i]]) for i in order])
    a6.set_yticks(range(len(pts)), [pts[i].point + (" (held)" if held[i] else "") for i in order], fontsize=6)
    for x in (-5, 5):
        a6.axvline(x, color="gray", ls="--", lw=1)
    a6.set_xlabel("law / measured - 1 (%)")
    a6.set_title("Error per point (black: held out)", fontsize=9)
    a6.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
