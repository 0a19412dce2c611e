"""train.claims' arms and plan (what runs, with how many tokens, and the CPU-hours estimate) and its row
store: one JSON row per finished run in <out>/rows/, refused when made under another plan."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.cli import BadInput
from model.config import count_params, get_config
from train.scaling import arch_overrides

CLAIMS = ("a", "b", "c", "d")
TOKENS_PER_PARAM = 20.0
D_MODEL, N_LAYERS, SEQ_LEN, BATCH = 64, 3, 128, 16
LR = 4e-3             # the tiny recipe's pre-training LR (WSD, 2% warmup, 20% decay to LR/10)
CONT_FRAC = 0.10      # (d) continuation tokens / pre-training tokens (tiny: QAT 150K after 1.4M)
CONT_LR = 2e-4        # tiny's QAT LR (constant)
EVAL_WINDOWS = 512    # held-out windows of SEQ_LEN targets, evenly spaced over the held-out store
CKPT_EVERY = 250
LOG_EVERY = 200
# tokens/s (1 torch thread, d 64, 3 layers, vocab 2048, T 128, batch 16): the claims' seed-2 runs, two workers
# on this 2-core dev VM, 2026-12-02 (dense 9,295; MoE arms 6,677-7,810; QAT continuations 7,321-7,578);
# `--plan --measure` re-times them here
MEASURED_TOK_S = {"dense": 9300.0, "moe": 7200.0, "qat": 7300.0}


class ClaimsError(BadInput):
    """A claims-run problem printed as one line (exit 2)."""


@dataclass
class Arm:
    name: str
    desc: str
    overrides: dict
    lb: float   # load-balance loss weight (train_stage writes it into the model config)
    z: float    # router z-loss weight

    @property
    def speed_kind(self) -> str:
        return "dense" if not self.overrides.get("n_experts") else "moe"


def make_arms(d: int = D_MODEL, n_layers: int = N_LAYERS, vocab: int = 2048) -> dict[str, Arm]:
    aux_free = dict(router_score="sigmoid", router_bias_coeff=1e-3, norm_topk_prob=True)
    base = dict(vocab=vocab, max_seq_len=max(512, SEQ_LEN))
    return {
        "dense": Arm("dense", f"dense SwiGLU FFN {4 * d}", arch_overrides(d, n_layers, **base), 0.0, 1e-4),
        "moe": Arm("moe", "24 experts top-3 + 1 shared, sigmoid + aux-free bias (the paper's layer)",
                   {**arch_overrides(d, n_layers, 8, 4, 1, **base), **aux_free}, 0.0, 1e-4),
        "softmax": Arm("softmax", "24 experts top-3 + 1 shared, softmax + LB loss 0.01",
                       {**arch_overrides(d, n_layers, 8, 4, 1, **base), "router_score": "softmax",
                        "router_bias_coeff": 0.0, "norm_topk_prob": True}, 0.01, 1e-4),
        "noshared": Arm("noshared", "32 experts top-4, no shared expert, sigmoid + aux-free bias",
                        {**arch_overrides(d, n_layers, 8, 4, 0, **base), **aux_free}, 0.0, 1e-4),
    }


CLAIM_ARMS = {"a": ("dense", "moe"), "b": ("softmax", "moe"), "c": ("noshared", "moe"), "d": ("moe",)}


@dataclass
class Run:
    key: str
    kind: str       # "pretrain" | "cont-float" | "cont-qat"
    arm: str
    seed: int
    tokens: int
    steps: int


@dataclass
class Plan:
    claims: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: dict[str, Arm]
    tokens: int            # pre-training tokens, every arm
    cont_tokens: int       # (d) continuation tokens
    seq_len: int = SEQ_LEN
    batch: int = BATCH
    lr: float = LR
    ratio: float = TOKENS_PER_PARAM
    eval_windows: int = EVAL_WINDOWS
    runs: list[Run] = field(default_factory=list)

    @property
    def step_tokens(self) -> int:
        return self.seq_len * self.batch

    def config(self, arm: str, seed: int):
        return get_config("tiny", **self.arms[arm].overrides, seed=seed)

    def fingerprint(self) -> str:
        """Everything a row's number depends on except the seed and the claim selection: rows of another
        plan are refused, never mixed in."""
        d = dict(arms={k: asdict(a) for k, a in self.arms.items()}, tokens=self.tokens, cont=self.cont_tokens,
                 seq_len=self.seq_len, batch=self.batch, lr=self.lr, cont_lr=CONT_LR, eval=self.eval_windows)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(claims=CLAIMS, seeds=(0, 1, 2), *, d: int = D_MODEL, n_layers: int = N_LAYERS, vocab: int = 2048,
              seq_len: int = SEQ_LEN, batch: int = BATCH, ratio: float = TOKENS_PER_PARAM,
              cont_frac: float = CONT_FRAC, eval_windows: int = EVAL_WINDOWS) -> Plan:
    claims = tuple(c for c in CLAIMS if c in claims)
    bad = sorted(set(claims) - set(CLAIMS))
    if bad or not claims:
        raise ClaimsError(f"unknown claim(s) {bad or '(none)'}: choose from {','.join(CLAIMS)}")
    if not seeds:
        raise ClaimsError("no seeds")
    arms = make_arms(d, n_layers, vocab)
    step = seq_len * batch
    # one token budget for every arm (equal tokens), sized by the largest active count of all arms
    active = max(count_params(get_config("tiny", **a.overrides))[1] for a in arms.values())
    steps = math.ceil(ratio * active / step)
    cont_steps = max(1, round(cont_frac * steps))
    plan = Plan(claims, tuple(seeds), arms, steps * step, cont_steps * step, seq_len, batch, LR, ratio, eval_windows)
    need = [a for a in arms if any(a in CLAIM_ARMS[c] for c in claims)]
    for s in seeds:  # seed-major: a cut-short run still has whole seeds for the paired comparisons
        plan.runs += [Run(f"pre-{a}-s{s}", "pretrain", a, s, plan.tokens, steps) for a in need]
        if "d" in claims:
            plan.runs += [Run(f"cont-{k}-s{s}", f"cont-{k}", "moe", s, plan.cont_tokens, cont_steps)
                          for k in ("float", "qat")]
    return plan


def run_seconds(plan: Plan, run: Run, tok_s: dict) -> float:
    if run.kind == "cont-qat":
        return run.tokens / tok_s["qat"]
    return run.tokens / tok_s[plan.arms[run.arm].speed_kind]


def plan_lines(plan: Plan, tok_s: dict, done: set[str] = frozenset()) -> list[str]:
    out = [f"claims {','.join(plan.claims)}, seeds {','.join(map(str, plan.seeds))}: d_model "
           f"{plan.arms['moe'].overrides['d_model']}, {plan.arms['moe'].overrides['n_layers']} layers, vocab "
           f"{plan.arms['moe'].overrides['vocab_size']}, T {plan.seq_len} x batch {plan.batch} = {plan.step_tokens} "
           f"tokens/step",
           f"{'arm':>9} {'active':>9} {'total':>10} {'tokens':>11} {'tok/active':>10}  what"]
    for a in dict.fromkeys(r.arm for r in plan.runs if r.kind == "pretrain"):
        total, act = count_params(plan.config(a, 0))
        out.append(f"{a:>9} {act:>9,} {total:>10,} {plan.tokens:>11,} {plan.tokens / act:>10.1f}  {plan.arms[a].desc}")
    if "d" in plan.claims:
        out.append(f"(d) continuations from moe: {plan.cont_tokens:,} tokens each ({plan.cont_tokens / plan.tokens:.0%}"
                   f" of pre-training), float and QAT, LR {CONT_LR:g} constant")
    left = [r for r in plan.runs if r.key not in done]
    sec = sum(run_seconds(plan, r, tok_s) for r in left)
    total = sum(run_seconds(plan, r, tok_s) for r in plan.runs)
    out.append(f"{len(plan.runs)} runs ({len(plan.runs) - len(left)} done); estimate {total / 3600:.1f} CPU hours in "
               f"all, {sec / 3600:.1f} left, at " + ", ".join(f"{k} {v:,.0f}" for k, v in tok_s.items())
               + " tok/s (1 thread)")
    return out



# ------------------------------------------------------------------------------------------------------
# rows
def rows_dir(out: Path) -> Path:
    return out / "rows"


def read_rows(out: str | os.PathLike) -> dict[str, dict]:
    d = rows_dir(Path(out))
    rows = {}
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClaimsError(f"{f}: unreadable row ({e})") from None
        rows[r["key"]] = r
    return rows


def done_keys(plan: Plan, rows: dict[str, dict]) -> set[str]:
    fp = plan.fingerprint()
    stale = sorted(k for k, r in rows.items() if r.get("plan") != fp)
    if stale:
        raise ClaimsError(f"rows {stale[:3]}{'...' if len(stale) > 3 else ''} were made with another plan "
                          f"(fingerprint differs); use a new --out")
    return set(rows)
