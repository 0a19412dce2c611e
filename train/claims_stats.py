"""train.claims' verdicts: per claim the per-seed paired difference, its 95% t-interval and what it says,
and the QAT gap-recovered figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (scipy.stats.t.ppf; a table, since importing
# scipy costs seconds on a busy machine); beyond 30 the df-30 value, slightly conservative
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def sample_sd(xs: list[float], mean: float) -> float:
    """The n-1 (sample) standard deviation; len(xs) >= 2."""
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def t_crit(df: int) -> float:
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[min(df, len(_T975)) - 1]


def paired_verdict(diffs: list[float], min_seeds: int = 3) -> dict:
    """diffs: per seed, the claimed-better arm's metric minus the other's (lower is better)."""
    n = len(diffs)
    out = dict(n=n, diffs=list(diffs), mean=float("nan"), sd=float("nan"), lo=float("nan"), hi=float("nan"))
    if n == 0:
        return dict(out, verdict="cannot resolve (no seeds)")
    mean = sum(diffs) / n
    out["mean"] = mean
    if n < 2:
        return dict(out, verdict=f"cannot resolve ({n} seed < {min_seeds})")
    sd = sample_sd(diffs, mean)
    half = t_crit(n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, lo=mean - half, hi=mean + half)
    if n < min_seeds:
        return dict(out, verdict=f"cannot resolve ({n} seeds < {min_seeds})")
    if out["hi"] < 0:
        return dict(out, verdict="supports")
    if out["lo"] > 0:
        return dict(out, verdict="contradicts")
    return dict(out, verdict="cannot resolve (the 95% interval contains 0)")


@dataclass
class Claim:
    id: str
    text: str
    better: str     # row key template of the claimed-better side, {s} = seed
    other: str
    metric: str
    unit: str = "nats/token"


CLAIM_TESTS = [
    Claim("a", "MoE (paper layer) has lower held-out loss than dense at equal active params and tokens",
          "pre-moe-s{s}", "pre-dense-s{s}", "val_loss"),
    Claim("b-loss", "sigmoid + aux-loss-free bias has lower held-out loss than softmax + LB loss",
          "pre-moe-s{s}", "pre-softmax-s{s}", "val_loss"),
    Claim("b-load", "sigmoid + aux-loss-free bias balances experts better (lower held-out max/mean load)",
          "pre-moe-s{s}", "pre-softmax-s{s}", "load_max_mean", "x mean load"),
    Claim("c", "a shared expert lowers held-out loss (vs one more routed expert, same active FFN)",
          "pre-moe-s{s}", "pre-noshared-s{s}", "val_loss"),
    Claim("d-ptq", "QAT INT4 beats PTQ INT4 of the start model (the uncontrolled comparison)",
          "cont-qat-s{s}", "cont-float-s{s}", "val_int4:start_ptq"),
    Claim("d-ctrl", "QAT INT4 beats PTQ INT4 of an equal-budget float continuation (the control)",
          "cont-qat-s{s}", "cont-float-s{s}", "val_int4"),
]


def claim_diffs(claim: Claim, rows: dict[str, dict], seeds) -> list[float]:
    better_m, _, other_m = claim.metric.partition(":")
    other_m = other_m or better_m
    out = []
    for s in seeds:
        b, o = rows.get(claim.better.format(s=s)), rows.get(claim.other.format(s=s))
        if b is None or o is None or b.get(better_m) is None or o.get(other_m) is None:
            continue
        out.append(float(b[better_m]) - float(o[other_m]))
    return out


def gap_recovered(rows: dict[str, dict], seeds) -> dict:
    """Per seed: naive = 1 - (QAT - float start) / (PTQ start - float start), the figure the tiny recipe
    prints; controlled = (PTQ(float cont) - QAT) / (PTQ(float cont) - float cont), the share of the continued
    float model's quantization gap that QAT closes at equal training."""
    naive, ctrl = [], []
    for s in seeds:
        q, f = rows.get(f"cont-qat-s{s}"), rows.get(f"cont-float-s{s}")
        if q is None or f is None:
            continue
        g0 = q["start_ptq"] - q["start_float"]
        gc = f["val_int4"] - f["val_loss"]
        if g0 > 0:
            naive.append(1 - (q["val_int4"] - q["start_float"]) / g0)
        if gc > 0:
            ctrl.append((f["val_int4"] - q["val_int4"]) / gc)
    return dict(naive=naive, controlled=ctrl)


def seeds_in(rows: dict[str, dict]) -> list[int]:
    return sorted({int(r["seed"]) for r in rows.values()})
