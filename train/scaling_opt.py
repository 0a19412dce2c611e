"""Architecture optimizer: the predicted-best MoE under a phone's memory and compute budgets.

Search space (every candidate is get_config(base, **overrides), so a valid ModelConfig):
    d_model, n_layers, head_dim 64 with GQA (>= 4 query heads per KV head), dense FFN = ffn_mult * d,
    sparsity X = n_experts / top_k, granularity G = dense FFN / expert FFN, shared experts s (same width as
    a routed expert), top_k = G - s (the active FFN stays the dense FFN: the law compares at equal N).
Budgets:
    memory   INT4 weight bytes (model.config.int4_weight_bytes, every matrix incl. the embedding) + fp16 KV
             cache at --context (model.config.kv_cache_bytes) <= --memory-gb
    compute  forward FLOPs per token at --context (model.config.flops_per_token) <= --active-flops, and/or
             decode latency = INT4 bytes read per token / --bandwidth-gbs <= --latency-ms
Objective: the fitted law's loss at --tokens training tokens (losses within 1e-4 relative count as a tie,
broken by the smaller memory, then FLOPs). Prints the best as a preset (base + overrides
for get_config), and the Pareto frontier of memory vs predicted loss among candidates within the compute budget.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import (
    ModelConfig,
    count_params,
    flops_per_token,
    get_config,
    int4_weight_bytes,
    kv_cache_bytes,
    param_breakdown,
)
from train.scaling_law import LawParams, predict


@dataclass
class Budget:
    memory_bytes: float
    context: int = 2048
    active_flops: float | None = None  # forward FLOPs per token at `context`
    latency_ms: float | None = None  # decode latency per token from weight bytes read / bandwidth
    bandwidth_gbs: float = 40.0  # phone LPDDR5(X) sustained read bandwidth, GB/s
    tokens: float = 6e12  # training tokens (the paper pre-trains on ~6T)


@dataclass
class SearchSpace:
    base: str = "S"
    d_models: tuple[int, ...] = (512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
    n_layers: tuple[int, ...] = (12, 16, 20, 24, 28, 32)
    ffn_mults: tuple[float, ...] = (2.75, 4.0)
    X: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    G: tuple[int, ...] = (1, 2, 4, 8, 16)
    shared: tuple[int, ...] = (0, 1, 2)
    head_dim: int = 64
    max_experts: int = 256
    min_expert_ffn: int = 64  # narrower experts leave the INT4 matmuls too small to run well on a phone


@dataclass
class Candidate:
    overrides: dict
    cfg: ModelConfig
    X: float
    G: float
    shared: int
    n_nonemb_active: int
    active: int
    total: int
    memory_bytes: int
    flops: int
    latency_ms: float
    loss: float = float("nan")

    def summary(self) -> dict:
        c = self.cfg
        return dict(d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                    ffn_dim=c.ffn_dim, n_experts=c.n_experts, top_k=c.top_k, expert_ffn_dim=c.expert_ffn_dim,
                    n_shared_experts=c.n_shared_experts, X=self.X, G=self.G, active_params=self.active,
                    total_params=self.total, memory_mb=self.memory_bytes / 1e6, gflops_per_token=self.flops / 1e9,
                    decode_ms=self.latency_ms, predicted_loss=self.loss)


def _round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def _kv_heads(h: int) -> int:
    """Largest divisor of h with at least 4 query heads per KV head (1 if none)."""
    return max([k for k in range(1, h + 1) if h % k == 0 and h // k >= 4] or [1])


def enumerate_candidates(space: SearchSpace, budget: Budget) -> list[Candidate]:
    out: list[Candidate] = []
    for d, L, fm in itertools.product(space.d_models, space.n_layers, space.ffn_mults):
        if d % space.head_dim:
            continue
        heads = d // space.head_dim
        ffn = _round32(fm * d)
        common = dict(d_model=d, n_layers=L, n_heads=heads, n_kv_heads=_kv_heads(heads), head_dim=space.head_dim,
                      ffn_dim=ffn, dense_layers=())
        shapes = [(1, 1, 0)] + [(X, G, s) for X, G, s in itertools.product(space.X, space.G, space.shared)
                                if X > 1 and G - s >= 1]
        for X, G, s in shapes:
            o = dict(common)
            if X == 1:
                o.update(n_experts=0, top_k=0, expert_ffn_dim=0, n_shared_experts=0, shared_ffn_dim=0)
                g_eff = 1.0
            else:
                f = ffn // G
                if f % 32 or f < space.min_expert_ffn:
                    continue
                k = G - s
                if X * k > space.max_experts:
                    continue
                o.update(n_experts=X * k, top_k=k, expert_ffn_dim=f, n_shared_experts=s, shared_ffn_dim=f if s else 0)
                g_eff = ffn / f
            cfg = get_config(space.base, **o)
            total, active = count_params(cfg)
            b = param_breakdown(cfg)
            ib = int4_weight_bytes(cfg)
            mem = ib["total"] + kv_cache_bytes(cfg, budget.context)
            fl = flops_per_token(cfg, budget.context)
            lat = ib["read_per_token"] / (budget.bandwidth_gbs * 1e9) * 1e3
            out.append(Candidate(overrides=o, cfg=cfg, X=float(X), G=float(g_eff), shared=s,
                                 n_nonemb_active=active - b["embedding"] - b["lm_head"], active=active, total=total,
                                 memory_bytes=mem, flops=fl, latency_ms=lat))
    return out


def within_compute(c: Candidate, budget: Budget) -> bool:
    if budget.active_flops is not None and c.flops > budget.active_flops:
        return False
    return budget.latency_ms is None or c.latency_ms <= budget.latency_ms


def score(cands: list[Candidate], params: LawParams, tokens: float) -> None:
    if not cands:
        return
    N = np.array([c.n_nonemb_active for c in cands], dtype=np.float64)
    X = np.array([c.X for c in cands])
    G = np.array([c.G for c in cands])
    S = np.array([c.shared for c in cands], dtype=np.float64)
    y = predict(params, N, np.full_like(N, tokens), X, G, S)
    for c, v in zip(cands, y):
        c.loss = float(v)


def pareto_memory(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not beaten by one with <= memory and lower loss (sorted by memory)."""
    front, best = [], math.inf
    for c in sorted(cands, key=lambda c: (c.memory_bytes, c.loss)):
        if c.loss < best - 1e-12:
            front.append(c)
            best = c.loss
    return front


def optimize(params: LawParams, budget: Budget, space: SearchSpace | None = None):
    """Returns (best Candidate or None, memory/loss Pareto frontier within the compute budget, every scored
    candidate within the compute budget)."""
    space = space or SearchSpace()
    if budget.memory_bytes <= 0:
        raise ValueError("memory budget must be > 0")
    if budget.active_flops is not None and budget.active_flops <= 0:
        raise ValueError("--active-flops must be > 0")
    if budget.latency_ms is not None and budget.latency_ms <= 0:
        raise ValueError("--latency-ms must be > 0")
    cands = [c for c in enumerate_candidates(space, budget) if within_compute(c, budget)]
    score(cands, params, budget.tokens)
    feasible = [c for c in cands if c.memory_bytes <= budget.memory_bytes]
    best = None
    if feasible:
        # predicted losses within 1e-4 (relative) are a tie the law cannot resolve: take the smallest memory
        lo = min(c.loss for c in feasible)
        best = min((c for c in feasible if c.loss <= lo * (1 + 1e-4)), key=lambda c: (c.memory_bytes, c.flops))
    return best, pareto_memory(cands), cands


# ------------------------------------------------------------------------------------------------------
# CLI
def add_optimize_args(p) -> None:
    from model import cli  # noqa: PLC0415
    from model.config import PRESETS  # noqa: PLC0415

    p.add_argument("--memory-gb", type=cli.positive_float, required=True, metavar="GB",
                   help="INT4 weights + fp16 KV cache budget (GB = 1e9 B)")
    p.add_argument("--context", type=cli.positive_int, default=2048, metavar="N",
                   help="context for the KV cache and attention FLOPs")
    p.add_argument("--active-flops", type=cli.positive_float, default=None, metavar="FLOPS",
                   help="max forward FLOPs per token at --context (this and/or --latency-ms is required)")
    p.add_argument("--latency-ms", type=cli.positive_float, default=None, metavar="MS",
                   help="max decode ms/token (bytes read / bandwidth)")
    p.add_argument("--bandwidth-gbs", type=cli.positive_float, default=40.0, metavar="GBS",
                   help="memory bandwidth (GB/s) for the latency estimate")
    p.add_argument("--tokens", type=cli.positive_float, default=6e12, metavar="D", help="training tokens D")
    p.add_argument("--fit", default="bench/results/scaling_fit.json", metavar="JSON",
                   help="fitted law JSON (python -m train.scaling fit)")
    p.add_argument("--base", type=cli.one_of(list(PRESETS)), default="S", metavar="PRESET",
                   help=f"preset supplying vocab / RoPE / context (get_config base): {cli.choices(list(PRESETS))}")
    p.add_argument("--frontier", type=cli.positive_int, default=12, metavar="N", help="frontier rows to print")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def load_params(path: str) -> LawParams:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no fitted law (run `python -m train.scaling fit <csv>` first)")
    try:
        d = json.loads(p.read_text())["params"]
        return LawParams(**{k: float(d[k]) for k in LawParams.__dataclass_fields__})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: malformed fit JSON ({e})") from e


def run_optimize(args) -> int:
    if args.active_flops is None and args.latency_ms is None:
        raise ValueError("give a compute budget: --active-flops and/or --latency-ms")
    if args.context <= 0:
        raise ValueError("--context must be > 0")
    params = load_params(args.fit)
    budget = Budget(memory_bytes=args.memory_gb * 1e9, context=args.context, active_flops=args.active_flops,
                    latency_ms=args.latency_ms, bandwidth_gbs=args.bandwidth_gbs, tokens=args.tokens)
    best, front, cands = optimize(params, budget, SearchSpace(base=args.base))
    if best is None:
        raise ValueError(f"no architecture in the search space fits {args.memory_gb} GB with that compute budget")
    preset = dict(base=args.base, overrides=best.overrides)
    if args.json:
        print(json.dumps(dict(best=best.summary(), preset=preset, frontier=[c.summary() for c in front],
                              n_candidates=len(cands)), indent=2))
        return 0
    print(f"{len(cands)} candidates within the compute budget; best within {args.memory_gb} GB "
          f"(INT4 weights + fp16 KV @ {args.context}):")
    s = best.summary()
    print(f"  predicted loss {s['predicted_loss']:.4f}  X={s['X']:g} G={s['G']:g} shared={s['n_shared_experts']}  "
          f"E={s['n_experts']} k={s['top_k']} expert_ffn={s['expert_ffn_dim']}  d={s['d_model']} L={s['n_layers']}")
    print(f"  active {s['active_params'] / 1e6:.0f}M / total {s['total_params'] / 1e6:.0f}M, memory {s['memory_mb']:.0f} MB, "
          f"{s['gflops_per_token']:.2f} GFLOPs/token, decode ~{s['decode_ms']:.1f} ms/token @ {args.bandwidth_gbs:g} GB/s")
    print("preset (model.config.get_config(base, **overrides)):")
    print("  " + json.dumps(preset))
    print(f"Pareto frontier (memory vs predicted loss, within the compute budget; {len(front)} points):")
    print("  mem MB  GFLOP/t  active M  total M    X    G  s    d   L  loss")
    step = max(1, len(front) // args.frontier)
    rows = front[::step] + ([best] if best not in front[::step] else [])
    for c in sorted(rows, key=lambda c: c.memory_bytes):
        t = c.summary()
        mark = " <=" if c is best else ""
        print(f"  {t['memory_mb']:6.0f}  {t['gflops_per_token']:7.2f}  {t['active_params'] / 1e6:8.0f}  "
              f"{t['total_params'] / 1e6:7.0f}  {t['X']:3g}  {t['G']:4.1f}  {t['n_shared_experts']}  {t['d_model']:4d} "
              f"{t['n_layers']:3d}  {t['predicted_loss']:.4f}{mark}")
    return 0
