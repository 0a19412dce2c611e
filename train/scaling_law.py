"""The MoE scaling law: its form, the Huber/L-BFGS fit, bootstrap intervals, predictions.

Form (loss in nats per token of the sweep's tokenizer):

    L(N, D, X, G, s) = E0 + A * N^-alpha * X^-delta * rho^[s>0] * (1 + g * G^-gamma) + B * D^-beta

    N      non-embedding ACTIVE parameters per token (attention + active FFN + router + norms), in millions
    D      training tokens, in millions
    X      routed expansion E/k (routed experts over experts used per token); 1 for a dense model
    G      granularity: dense-equivalent FFN width over one expert's width (Krajewski et al. 2024); 1 for dense
    s      number of shared experts (enters as an indicator: rho < 1 means a shared expert helps)

Why this form:
- Chinchilla (Hoffmann et al. 2022): E0 + A/N^alpha + B/D^beta, with E0 the irreducible entropy.
- Krajewski et al. 2024 put granularity into the parameter term as (a + g/G^gamma)/N^alpha: finer experts
  lower the loss with diminishing returns; we write the same thing as A * (1 + g * G^-gamma).
- Ludziejewski et al. 2025 fit the joint law in active parameters, tokens and expansion, where expansion
  scales the parameter term like a power; a multiplicative X^-delta is the simplest such term (their
  interaction of expansion with the exponents is left out: the CPU sweep cannot identify it).
- Shared experts get one multiplicative constant rho (DeepSeekMoE's claim is a constant-factor gain).
- Non-embedding N (Kaplan et al. 2020): at CPU-grid widths the embedding would otherwise dominate N.

Fit (Hoffmann et al. 2022, approach 3): minimise sum Huber_h(log L_pred - log L_obs), h = 1e-3, with L-BFGS
(scipy) from a grid of starting points, positive constants in log space; bootstrap (resample points with
replacement, refit from the best starts) for 95% intervals on every constant.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

# internal parameter vector (log for positive constants):
#   e = log E0, la = log A, alpha, delta, lrho = log rho, lg = log g, gamma, lb = log B, beta
PARAM_NAMES = ("e", "la", "alpha", "delta", "lrho", "lg", "gamma", "lb", "beta")
# exponents are kept in a physical range; log constants are free within wide bounds, except the irreducible
# loss: E0 >= 0.5 nats (per byte on the CPU grid; ~0.7 bits/byte, below the best text compressors), so a
# short sweep cannot "explain" its whole loss by a power law that decays to zero
BOUNDS = [(math.log(0.5), 3), (-8, 8), (0.0, 2.0), (-1.0, 2.0), (-2.0, 2.0), (-8, 5), (0.0, 3.0), (-8, 8), (0.0, 2.0)]
HUBER_DELTA = 1e-3


@dataclass
class LawParams:
    E0: float
    A: float
    alpha: float
    delta: float
    rho: float
    g: float
    gamma: float
    B: float
    beta: float

    @classmethod
    def from_vector(cls, v) -> LawParams:
        e, la, alpha, delta, lrho, lg, gamma, lb, beta = (float(x) for x in v)
        return cls(E0=math.exp(e), A=math.exp(la), alpha=alpha, delta=delta, rho=math.exp(lrho), g=math.exp(lg),
                   gamma=gamma, B=math.exp(lb), beta=beta)

    def to_vector(self) -> np.ndarray:
        return np.array([math.log(self.E0), math.log(self.A), self.alpha, self.delta, math.log(self.rho),
                         math.log(self.g), self.gamma, math.log(self.B), self.beta])

    def as_dict(self) -> dict[str, float]:
        return dict(E0=self.E0, A=self.A, alpha=self.alpha, delta=self.delta, rho=self.rho, g=self.g,
                    gamma=self.gamma, B=self.B, beta=self.beta)


def _features(N, D, X, G, S):
    """Arrays in the law's units: N and D in millions, shared as an indicator."""
    N, D, X, G, S = (np.asarray(a, dtype=np.float64) for a in (N, D, X, G, S))
    if np.any(N <= 0) or np.any(D <= 0) or np.any(X < 1) or np.any(G <= 0):
        raise ValueError("scaling law inputs need N > 0, D > 0, X >= 1, G > 0")
    return np.log(N / 1e6), np.log(D / 1e6), np.log(X), np.log(G), (S > 0).astype(np.float64)


def _predict_log_terms(v, feats):
    e, la, alpha, delta, lrho, lg, gamma, lb, beta = v
    lN, lD, lX, lG, sh = feats
    # log of each additive term (log-sum-exp keeps the fit stable for any start)
    t_irr = np.full_like(lN, e)
    t_par = la - alpha * lN - delta * lX + lrho * sh + np.logaddexp(0.0, lg - gamma * lG)
    t_dat = lb - beta * lD
    return t_irr, t_par, t_dat


def predict_vec(v, feats) -> np.ndarray:
    t_irr, t_par, t_dat = _predict_log_terms(v, feats)
    return np.exp(np.logaddexp(np.logaddexp(t_irr, t_par), t_dat))


def predict(p: LawParams, N, D, X, G, S) -> np.ndarray:
    """Predicted loss for arrays (or scalars) of N (active non-embedding params), D (tokens), X, G, S."""
    return predict_vec(p.to_vector(), _features(N, D, X, G, S))


def _huber(r, h):
    a = np.abs(r)
    return np.where(a <= h, 0.5 * r * r, h * (a - 0.5 * h))


def _objective(v, feats, logy, h):
    t_irr, t_par, t_dat = _predict_log_terms(v, feats)
    lp = np.logaddexp(np.logaddexp(t_irr, t_par), t_dat)
    r = lp - logy
    # analytic gradient: d lp / d term_i = softmax weight of that term
    w_irr, w_par, w_dat = np.exp(t_irr - lp), np.exp(t_par - lp), np.exp(t_dat - lp)
    dh = np.clip(r, -h, h)  # Huber derivative
    e, la, alpha, delta, lrho, lg, gamma, lb, beta = v
    lN, lD, lX, lG, sh = feats
    sg = 1.0 / (1.0 + np.exp(-(lg - gamma * lG)))  # d/d(lg) of log(1 + exp(lg - gamma lG))
    grad = np.array([
        np.sum(dh * w_irr),
        np.sum(dh * w_par),
        np.sum(dh * w_par * -lN),
        np.sum(dh * w_par * -lX),
        np.sum(dh * w_par * sh),
        np.sum(dh * w_par * sg),
        np.sum(dh * w_par * sg * -lG),
        np.sum(dh * w_dat),
        np.sum(dh * w_dat * -lD),
    ])
    # scaled by 1/(n h^2) so the objective is O(1): L-BFGS-B's ftol is relative to max(|f|, 1)
    scale = 1.0 / (len(r) * h * h)
    return float(np.sum(_huber(r, h))) * scale, grad * scale


def default_starts() -> list[np.ndarray]:
    """The grid of starting points (Hoffmann et al. use a grid over every constant; ours is 2^6 = 64)."""
    starts = []
    for e, alpha, beta, delta, gamma, lab in itertools.product(
            (-1.0, 0.5), (0.15, 0.6), (0.15, 0.6), (0.0, 0.3), (0.3, 1.0), (-1.0, 1.0)):
        starts.append(np.array([e, lab, alpha, delta, 0.0, -1.0, gamma, lab, beta]))  # e clipped to its bound
    return starts


@dataclass
class FitResult:
    params: LawParams
    loss: float
    n_points: int
    starts: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_boot: int = 0
    top_starts: list = field(default_factory=list, repr=False)


def _fit_once(feats, logy, starts, h, fixed: dict[int, float] | None = None):
    best, ranked = None, []
    bounds = list(BOUNDS)
    for i, val in (fixed or {}).items():
        bounds[i] = (val, val)
    for x0 in starts:
        x0 = np.array([min(max(x, lo), hi) for x, (lo, hi) in zip(x0, bounds)])
        res = minimize(_objective, x0, args=(feats, logy, h), jac=True, method="L-BFGS-B", bounds=bounds,
                       options=dict(maxiter=500, ftol=1e-10, gtol=1e-7))
        ranked.append((float(res.fun), res.x))
        if best is None or res.fun < best.fun:
            best = res
    ranked.sort(key=lambda t: t[0])
    return best, [x for _, x in ranked[:2]]


def fit_law(N, D, X, G, S, loss, *, starts: list[np.ndarray] | None = None, n_boot: int = 100, seed: int = 0,
            huber_delta: float = HUBER_DELTA, fix_shared: bool | None = None) -> FitResult:
    """Fit the law to measured losses. fix_shared: pin rho = 1 (auto: when no point or every point has a shared
    expert, rho is not identifiable). Bootstrap: n_boot resamples refit from the 2 best full-data starts."""
    feats = _features(N, D, X, G, S)
    y = np.asarray(loss, dtype=np.float64)
    if y.ndim != 1 or len(y) != len(feats[0]):
        raise ValueError("fit_law: loss must be a 1-D array matching the inputs")
    if np.any(y <= 0):
        raise ValueError("fit_law: losses must be > 0")
    if len(y) < 4:
        raise ValueError(f"fit_law: need at least 4 points, got {len(y)}")
    sh = feats[4]
    if fix_shared is None:
        fix_shared = bool(sh.min() == sh.max())
    fixed = {PARAM_NAMES.index("lrho"): 0.0} if fix_shared else {}
    # granularity / expansion are unidentifiable without variation: pin them to "no effect"
    if np.ptp(feats[3]) == 0:
        fixed[PARAM_NAMES.index("lg")] = -8.0
        fixed[PARAM_NAMES.index("gamma")] = 0.0
    if np.ptp(feats[2]) == 0:
        fixed[PARAM_NAMES.index("delta")] = 0.0
    logy = np.log(y)
    starts = starts if starts is not None else default_starts()
    best, top = _fit_once(feats, logy, starts, huber_delta, fixed)
    out = FitResult(params=LawParams.from_vector(best.x), loss=float(best.fun), n_points=len(y), starts=len(starts),
                    top_starts=top)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            f_b = tuple(a[idx] for a in feats)
            b, _ = _fit_once(f_b, logy[idx], top, huber_delta, fixed)
            samples.append(LawParams.from_vector(b.x).as_dict())
        keys = samples[0].keys()
        out.ci = {k: (float(np.percentile([s[k] for s in samples], 2.5)),
                      float(np.percentile([s[k] for s in samples], 97.5))) for k in keys}
        out.n_boot = n_boot
    return out
