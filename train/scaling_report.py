"""Plots (PNG) and bench/results/scaling_v1.md from the sweep CSV and the fitted-law JSON (the v1 law;
train.scaling_v2 writes scaling.md).

    scaling_params.png      loss vs active non-embedding params, dense and MoE, with the fitted curves
    scaling_moe_axes.png    loss vs sparsity X and vs granularity G at fixed active params, with the law
    scaling_frontier.png    the optimizer's memory / predicted-loss frontier under phone budgets
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from train.scaling import read_csv, rows_to_arrays
from train.scaling_law import LawParams, predict
from train.scaling_opt import Budget, SearchSpace, optimize

# the phone budgets the report evaluates: an S-class phone model and the 3 GB example
PHONE_BUDGETS = (
    dict(label="1 GB, 0.9 GFLOPs/token @2k (MobileMoE-S class)", memory_gb=1.0, active_flops=0.9e9, context=2048),
    dict(label="3 GB, 1.5 GFLOPs/token @2k", memory_gb=3.0, active_flops=1.5e9, context=2048),
    dict(label="1 GB, decode <= 5 ms/token @ 40 GB/s", memory_gb=1.0, latency_ms=5.0, context=2048),
)


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _is_held(r: dict) -> bool:
    return r["holdout"] in ("1", "True", "true")


def _base_name(r: dict) -> str:
    return r["name"].split("-T")[0]


def plot_params(rows, p: LawParams, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ladder = [r for r in rows if "-T" not in r["name"] and (r["family"] == "dense" or r["name"].endswith("X8-G4-s1"))]
    for fam, color, X, G, S in (("dense", "tab:blue", 1, 1, 0), ("moe", "tab:red", 8, 4, 1)):
        pts = [r for r in ladder if r["family"] == fam]
        if not pts:
            continue
        N = np.array([float(r["active_nonemb"]) for r in pts])
        D = np.array([float(r["tokens"]) for r in pts])
        y = np.array([float(r["val_loss"]) for r in pts])
        held = np.array([_is_held(r) for r in pts])
        lab = "dense" if fam == "dense" else "MoE X=8 G=4 +1 shared"
        ax.scatter(N[~held], y[~held], color=color, label=f"{lab} (fit)")
        if held.any():
            ax.scatter(N[held], y[held], color=color, marker="*", s=160, edgecolor="k", label=f"{lab} (held out)")
        # tokens follow the grid's rule D ~ N: interpolate log D on log N along the ladder
        coef = np.polyfit(np.log(N), np.log(D), 1) if len(N) > 1 else (1.0, np.log(D[0] / N[0]))
        Ng = np.geomspace(N.min() / 1.5, N.max() * 3, 60)
        Dg = np.exp(np.polyval(coef, np.log(Ng)))
        ax.plot(Ng, predict(p, Ng, Dg, np.full_like(Ng, X), np.full_like(Ng, G), np.full_like(Ng, S)), color=color)
    tv = [r for r in rows if "-T" in r["name"]]
    if tv:
        ax.scatter([float(r["active_nonemb"]) for r in tv], [float(r["val_loss"]) for r in tv], color="gray",
                   marker="x", label="token-budget variants")
    ax.set_xscale("log")
    ax.set_xlabel("active non-embedding parameters N")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("Loss vs active params (tokens = 1.0 x active params)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def plot_moe_axes(rows, p: LawParams, path: Path, d_center: int = 64) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    at = [r for r in rows if int(r["d_model"]) == d_center and "-T" not in r["name"]]
    ref = next((r for r in at if r["name"].endswith("X8-G4-s1")), None)
    if ref is None:
        plt.close(fig)
        return
    N0, D0 = float(ref["active_nonemb"]), float(ref["tokens"])
    # sparsity: G=4, one shared expert (+ the dense point at X=1)
    sp = [r for r in at if float(r["G"]) == 4 and int(r["n_shared_experts"]) == 1] + \
         [r for r in at if r["family"] == "dense"]
    a1.scatter([float(r["X"]) for r in sp], [float(r["val_loss"]) for r in sp], color="tab:red", zorder=3,
               label="measured (X=1: dense)")
    Xg = np.geomspace(1, 64, 50)
    a1.plot(Xg, predict(p, np.full_like(Xg, N0), np.full_like(Xg, D0), Xg, np.full_like(Xg, 4.0),
                        np.full_like(Xg, 1.0)), color="tab:red", label="law (G=4, shared)")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("sparsity X = experts / top-k")
    a1.set_ylabel("held-out loss (nats/byte)")
    a1.set_title(f"Sparsity at fixed active params (d={d_center})")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    gr = [r for r in at if r["family"] == "moe" and float(r["X"]) == 8]
    for s, color in ((0, "tab:blue"), (1, "tab:green")):
        pts = [r for r in gr if (int(r["n_shared_experts"]) > 0) == bool(s)]
        a2.scatter([float(r["G"]) for r in pts], [float(r["val_loss"]) for r in pts], color=color, zorder=3,
                   label=f"measured, {'1 shared' if s else 'no shared'}")
        Gg = np.geomspace(1, 32, 50)
        a2.plot(Gg, predict(p, np.full_like(Gg, N0), np.full_like(Gg, D0), np.full_like(Gg, 8.0), Gg,
                            np.full_like(Gg, float(s))), color=color, label=f"law, {'shared' if s else 'no shared'}")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("granularity G = dense FFN / expert FFN")
    a2.set_title(f"Granularity at fixed active params, X=8 (d={d_center})")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def run_budgets(p: LawParams, tokens: float = 6e12):
    out = []
    for b in PHONE_BUDGETS:
        budget = Budget(memory_bytes=b["memory_gb"] * 1e9, context=b["context"], active_flops=b.get("active_flops"),
                        latency_ms=b.get("latency_ms"), tokens=tokens)
        best, front, cands = optimize(p, budget, SearchSpace())
        out.append((b, budget, best, front, cands))
    return out


def plot_frontier(results, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    b, budget, best, front, cands = results[0]
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    mem = np.array([c.memory_bytes for c in cands]) / 1e9
    loss = np.array([c.loss for c in cands])
    Xs = np.array([c.X for c in cands])
    sc = ax.scatter(mem, loss, c=np.log2(Xs), s=5, cmap="viridis", alpha=0.5)
    fig.colorbar(sc, ax=ax, label="log2 sparsity X (0 = dense)")
    ax.plot([c.memory_bytes / 1e9 for c in front], [c.loss for c in front], color="k", lw=1.5, label="Pareto frontier")
    ax.axvline(budget.memory_bytes / 1e9, color="tab:red", ls="--", label="memory budget")
    if best is not None:
        ax.scatter([best.memory_bytes / 1e9], [best.loss], marker="*", s=250, color="tab:red", edgecolor="k",
                   zorder=4, label=f"best: X={best.X:g} G={best.G:g} s={best.shared}")
    dense = [c for c in cands if c.X == 1 and c.memory_bytes <= budget.memory_bytes]
    if dense:
        bd = min(dense, key=lambda c: c.loss)
        ax.scatter([bd.memory_bytes / 1e9], [bd.loss], marker="D", s=70, color="tab:blue", edgecolor="k", zorder=4,
                   label="best dense")
    ax.set_xscale("log")
    ax.set_xlabel("INT4 weights + fp16 KV cache (GB)")
    ax.set_ylabel("predicted loss (CPU-sweep law, extrapolated)")
    ax.set_title(f"Optimizer frontier: {b['label']}", fontsize=9)
    lo, hi = np.percentile(loss, 0.5), np.percentile(loss, 60)
    if dense:
        hi = max(hi, bd.loss + 0.1 * (bd.loss - lo))
    ax.set_ylim(lo - 0.02 * abs(lo), hi)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def _fmt_ci(fit: dict, k: str) -> str:
    lo, hi = fit["ci95"].get(k, (float("nan"), float("nan")))
    return f"[{lo:.3g}, {hi:.3g}]"


NOTES_BEGIN, NOTES_END = "<!-- notes: kept across regenerations -->", "<!-- /notes -->"


def make_report(csv_path, fit_path, out_dir) -> Path:
    """Write the three PNGs and scaling_v1.md. The interpretation of a run's numbers is written by a person between
    the NOTES markers of scaling_v1.md; a regeneration keeps that block (it is not generated from code)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "scaling_v1.md"
    notes = ""
    if md.exists():
        old = md.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) + len(NOTES_BEGIN):old.index(NOTES_END)].strip()
    rows = [r for r in read_csv(csv_path) if r.get("val_loss")]
    fit = json.loads(Path(fit_path).read_text())
    p = LawParams(**fit["params"])
    plot_params(rows, p, out / "scaling_params.png")
    plot_moe_axes(rows, p, out / "scaling_moe_axes.png")
    res = run_budgets(p)
    plot_frontier(res, out / "scaling_frontier.png")
    N, D, X, G, S, y = rows_to_arrays(rows)
    pred = predict(p, N, D, X, G, S)
    L = ["# On-device MoE scaling law, v1: CPU sweep, fit, held-out validation, optimizer", "",
         "Superseded by [scaling.md](scaling.md) (v2: BPE corpus, per-point LR, 2 seeds); kept for its history.", ""]
    L += ["Generated by `python -m train.scaling report` (`make scaling-law` runs sweep + fit + report). "
          "Byte-level Shakespeare (train.data split: whole plays held out), 3-layer models, loss = held-out "
          "nats/byte on the same 64k held-out bytes for every point.", ""]
    L += ["## Runs", "",
          "| point | fit/held | d | E | k | expert FFN | shared | X | G | active non-emb | total | tokens | "
          "val loss | law | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, q in zip(rows, pred):
        L.append(f"| {r['name']} | {'**held**' if _is_held(r) else 'fit'} | {r['d_model']} | {r['n_experts']} | "
                 f"{r['top_k']} | {r['expert_ffn_dim']} | {r['n_shared_experts']} | {float(r['X']):g} | "
                 f"{float(r['G']):g} | {int(r['active_nonemb']):,} | {int(r['total_params']):,} | {int(r['tokens']):,} | "
                 f"{float(r['val_loss']):.4f} | {q:.4f} | {float(r['seconds']):.0f} |")
    L += ["", "## Fitted law", "", f"`{fit['form']}`", "",
          f"Huber (delta 1e-3) on log residuals, L-BFGS-B from {fit.get('n_starts', 64)} starts of a 64-point grid, "
          f"{fit['n_points']} points "
          f"(held-out excluded), {fit['n_boot']} bootstrap refits for the 95% intervals. "
          f"Relative RMSE on the fit points: {fit['train_rmse_rel'] * 100:.2f}%.", "",
          "| constant | value | 95% CI |", "|---|---|---|"]
    for k, v in fit["params"].items():
        L.append(f"| {k} | {v:.4g} | {_fmt_ci(fit, k)} |")
    L += ["", "## Held-out validation (largest points, not in the fit)", "",
          "| point | measured | predicted | error |", "|---|---|---|---|"]
    for h in fit["heldout"]:
        L.append(f"| {h['name']} | {h['measured']:.4f} | {h['predicted']:.4f} | {h['rel_err'] * 100:+.2f}% |")
    L += ["", "![loss vs params](scaling_params.png)", "", "![sparsity and granularity](scaling_moe_axes.png)", ""]
    L += ["## Optimizer at phone budgets", "",
          "`python -m train.scaling optimize --memory-gb M --context 2048 --active-flops F` over d 512-2048, "
          "12-32 layers, X 1-64, G 1-16 (expert FFN >= 64), 0-2 shared experts, vocab 49152 (preset S), "
          "D = 6e12 tokens. Memory = INT4 g32 weights (embedding included) + fp16 KV at 2k.", "",
          "| budget | best X | G | shared | E / k | expert FFN | d x L | active | total | memory MB | GFLOPs/tok | "
          "pred. loss | best dense loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, budget, best, _front, cands in res:
        dense = [c for c in cands if c.X == 1 and c.memory_bytes <= budget.memory_bytes]
        bd = min(dense, key=lambda c: c.loss).loss if dense else float("nan")
        if best is None:
            L.append(f"| {b['label']} | none fits | | | | | | | | | | | |")
            continue
        c = best.cfg
        L.append(f"| {b['label']} | {best.X:g} | {best.G:g} | {best.shared} | {c.n_experts} / {c.top_k} | "
                 f"{c.expert_ffn_dim} | {c.d_model} x {c.n_layers} | {best.active / 1e6:.0f}M | {best.total / 1e6:.0f}M | "
                 f"{best.memory_bytes / 1e6:.0f} | {best.flops / 1e9:.2f} | {best.loss:.4f} | {bd:.4f} |")
    L += ["", "![optimizer frontier](scaling_frontier.png)", ""]
    L += ["## What the data says", "", NOTES_BEGIN, notes or "_(interpretation not written yet)_", NOTES_END, ""]
    fd, tmp = tempfile.mkstemp(prefix=".scaling_v1.md.", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(tmp, md)
    return md
