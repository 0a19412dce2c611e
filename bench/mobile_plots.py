"""bench.mobile's plots (matplotlib, Agg): decode and prefill tok/s per size and engine, decode as a fraction of
the STREAM roofline, and where our engine's decode time goes (its per-op timers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mobile.engine import TIMERS


def write_plots(agg, sizes, threads, engines, bw, read_bytes, out: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    med = agg["med"]
    files = []

    def bars(kind, key, fname, title):
        fig, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 3.8), squeeze=False)
        for ax, t in zip(axes[0], threads):
            x = np.arange(len(sizes))
            w = 0.8 / len(engines)
            for j, e in enumerate(engines):
                ys = [med.get((s, t, e, kind, key), float("nan")) for s in sizes]
                ax.bar(x + (j - (len(engines) - 1) / 2) * w, ys, w, label=e)
                for xi, y in zip(x, ys):
                    if y == y:
                        ax.text(xi + (j - (len(engines) - 1) / 2) * w, y, f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                                ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, sizes)
            ax.set_title(f"{title}, {t} thread{'s' if t > 1 else ''}")
            ax.set_ylabel("tokens/s")
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)

    bars("decode", "0", "mobile_decode.png", "decode (ctx 0)")
    pk = max((int(k[4]) for k in med if k[3] == "prefill"), default=512)  # the longest prompt measured
    bars("prefill", str(pk), "mobile_prefill.png", f"prefill ({pk}-token prompt)")

    fig, ax = plt.subplots(figsize=(6 + len(threads), 3.8))
    x = np.arange(len(sizes))
    combos = [(e, t) for t in threads for e in engines]
    w = 0.8 / len(combos)
    for j, (e, t) in enumerate(combos):
        ys = [med.get((s, t, e, "decode", "0"), float("nan")) * read_bytes[s] / (bw[t]["best_gbs"] * 1e9)
              for s in sizes]
        ax.bar(x + (j - (len(combos) - 1) / 2) * w, [100 * y for y in ys], w, label=f"{e}, {t}t")
    ax.axhline(80, color="k", ls="--", lw=0.8)
    ax.set_xticks(x, sizes)
    ax.set_ylabel("% of STREAM roofline")
    ax.set_title("decode as a fraction of the bandwidth roofline (ctx 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mobile_roofline.png", dpi=110)
    plt.close(fig)
    files.append("mobile_roofline.png")

    if "ours" in engines:
        t = threads[0]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        bottom = np.zeros(len(sizes))
        for k in TIMERS:
            ys = np.array([1e3 * med.get((s, t, "ours", "profile", "0"), {}).get(k, 0.0) for s in sizes])
            ax.bar(sizes, ys, bottom=bottom, label=k)
            bottom += ys
        ax.set_ylabel("ms per decoded token")
        ax.set_title(f"our engine: decode time by op ({t} thread{'s' if t > 1 else ''}, ctx 0)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mobile_profile.png", dpi=110)
        plt.close(fig)
        files.append("mobile_profile.png")
    return files

