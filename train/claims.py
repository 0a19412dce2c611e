"""The paper's architecture and quantization claims, tested with controls at tiny scale on CPU.

    python -m train.claims --plan                   # arms, params, tokens, estimated CPU hours
    python -m train.claims [--only a,b] [--seeds 0,1,2] [--out runs/claims] [--corpus data/corpus]
    python -m train.claims --report                 # bench/results/claims.md + claims.png + claims_load.png

Claims (each arm trained for every seed; seed s = model init s and data order s, the same for every arm,
so arms are compared seed by seed):
  (a) MoE vs dense at equal active parameters and equal tokens: the paper's MoE layer (fine-grained experts
      of a quarter of the dense FFN, top-3 + 1 shared expert, X = E/k = 8, sigmoid + aux-loss-free bias)
      against a dense model whose FFN equals the MoE's active FFN. Tokens = TOKENS_PER_PARAM (>= 20) x the
      largest active parameter count of the arms (embedding included), so experts are not starved.
  (b) sigmoid + aux-loss-free bias vs softmax + load-balance loss (0.01), same shapes: held-out loss and the
      held-out max/mean expert load (1.0 = perfectly balanced), per layer then averaged.
  (c) shared expert vs none: the same active FFN, the shared expert replaced by one more routed expert
      (top-4 of 32 instead of top-3 of 24 + shared).
  (d) QAT vs PTQ vs an equal-budget float continuation: from the (a) MoE model (pre-trained, WSD-annealed; the
      offline corpus has no chat data, so it stands in for the SFT model), continue CONT_FRAC of the
      pre-training tokens (constant LR, the tiny recipe's QAT settings) once with INT4 g32 weights + int8
      activations fake-quantised (QAT) and once in float, on the same batches. Deployable INT4 losses: PTQ of
      the start, QAT, and PTQ of the float continuation (the control the "QAT recovers x% of the PTQ gap"
      figure lacks: part of that recovery may be just more training).

Verdicts: per claim the per-seed paired difference (the claimed-better arm minus the other; lower is
better), its mean and a 95% t-interval over seeds. The interval below zero: the data supports the claim;
above zero: contradicts it; straddling zero, or fewer than 3 seeds: cannot resolve. Never a win by a mean.

Resumable: each run's result is one JSON row in <out>/rows/ (a finished run is skipped), a running run
checkpoints every CKPT_EVERY steps in <out>/runs/<key>/ and continues from there; the pre-trained models are
kept in <out>/models/ (for (d)). The data are the offline corpus (`python -m train.corpus build`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.atomic import atomic_write
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
DEFAULT_OUT = "runs/claims"
DEFAULT_CORPUS = "data/corpus"
RESULTS = Path("bench/results")
# tokens/s (1 torch thread, d 64, 3 layers, vocab 2048, T 128, batch 16) measured on this 2-core machine
# under load average 3-6 from other jobs, 2026-12-01; `--plan --measure` re-times them here
MEASURED_TOK_S = {"dense": 5100.0, "moe": 3700.0, "qat": 2300.0}


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
# data
@dataclass
class Data:
    train: object          # TokenStore
    val_BT1: object        # (N, T+1) int64 held-out windows
    vocab: int


def open_data(corpus: str | os.PathLike, seq_len: int, n_windows: int = EVAL_WINDOWS) -> Data:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from train.store import TokenStore  # noqa: PLC0415

    root = Path(corpus)
    if not (root / "corpus.json").is_file():
        raise ClaimsError(f"{corpus}: no finished corpus (run `python -m train.corpus build --out {corpus}`)")
    tr, ho = TokenStore(root / "store" / "train"), TokenStore(root / "store" / "heldout")
    n = (ho.n_tokens - 1) // seq_len
    if n < 1 or tr.n_tokens < 4 * (seq_len + 1):
        raise ClaimsError(f"{corpus}: too small ({tr.n_tokens} train / {ho.n_tokens} held-out tokens)")
    pick = np.unique(np.linspace(0, n - 1, min(n, n_windows)).astype(np.int64))
    val = np.stack([ho.read(int(w) * seq_len, seq_len + 1).astype(np.int64) for w in pick])
    return Data(tr, torch.from_numpy(val), tr.vocab_size)


# ------------------------------------------------------------------------------------------------------
# one run
class _Progress:
    """train_stage's tracker interface, printing one line every LOG_EVERY steps."""

    def __init__(self, key: str, steps: int, log):
        self.key, self.steps, self.log, self.t0 = key, steps, log, time.time()

    def log_step(self, rec: dict, step: int) -> None:
        el = time.time() - self.t0
        self.log(f"    [{self.key}] step {step + 1}/{self.steps} ce {rec['ce']:.4f} {rec['tokens_per_s']:.0f} tok/s "
                 f"({el / 60:.1f} min)")

    def log_eval(self, ev: dict, step: int) -> None:
        pass

    def summary(self, d: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def expert_load(model, val_BT1, micro: int) -> dict | None:
    """Held-out max/mean expert load (selection counts, the balancing bias included), per MoE layer."""
    import torch  # noqa: PLC0415

    if not model.cfg.is_moe:
        return None
    was = model.training
    model.eval()
    counts = None
    with torch.no_grad():
        for i in range(0, val_BT1.shape[0], micro):
            model(val_BT1[i:i + micro, :-1])
            c = model.aux["expert_counts"].double()
            counts = c if counts is None else counts + c
    model.train(was)
    per_layer = (counts.max(-1).values / counts.mean(-1)).tolist()
    return dict(load_max_mean=sum(per_layer) / len(per_layer), load_max_mean_worst=max(per_layer),
                load_per_layer=[round(x, 4) for x in per_layer])


def _stage(plan: Plan, run: Run):
    from train.loop import StageConfig  # noqa: PLC0415

    arm = plan.arms[run.arm]
    common = dict(name=run.key, tokens=run.tokens, seq_len=plan.seq_len, global_batch=plan.batch,
                  micro_batch=plan.batch, lb_loss_weight=arm.lb, z_loss_weight=arm.z, ckpt_every=CKPT_EVERY,
                  log_every=LOG_EVERY, grad_clip=1.0, betas=(0.9, 0.95))
    if run.kind == "pretrain":
        return StageConfig(kind="pretrain", lr=plan.lr, min_lr=plan.lr / 10, schedule="wsd", warmup_frac=0.02,
                           decay_frac=0.2, weight_decay=0.1, **common)
    return StageConfig(kind="qat" if run.kind == "cont-qat" else "sft", qat=run.kind == "cont-qat", lr=CONT_LR,
                       min_lr=CONT_LR, schedule="constant", warmup_frac=0.05, weight_decay=0.0, **common)


def _save_model(model, path: Path) -> None:
    import io  # noqa: PLC0415

    import torch  # noqa: PLC0415

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write(path, buf.getvalue())


def execute(plan: Plan, run: Run, data: Data, out: Path, log=print) -> dict:
    """Train one run (resuming its checkpoint) and return its row."""
    import torch  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415
    from train.loop import evaluate, train_stage  # noqa: PLC0415
    from train.store import StoreMixture  # noqa: PLC0415

    cfg = plan.config(run.arm, run.seed)
    if cfg.vocab_size < data.vocab:
        raise ClaimsError(f"the corpus vocabulary {data.vocab} exceeds the model's {cfg.vocab_size}")
    model = MobileMoE(cfg)
    total, active = count_params(cfg)
    row = dict(key=run.key, kind=run.kind, arm=run.arm, seed=run.seed, tokens=run.tokens, steps=run.steps,
               active_params=active, total_params=total, plan=plan.fingerprint())

    def ev(qat: bool) -> float:
        model.set_qat(qat)
        v = evaluate(model, data.val_BT1, torch.ones(data.val_BT1.shape[0], plan.seq_len, dtype=torch.long),
                     plan.batch, "cpu")
        model.set_qat(False)
        return v

    salt = 0
    if run.kind != "pretrain":
        start = out / "models" / f"pre-{run.arm}-s{run.seed}.pt"
        if not start.is_file():
            raise ClaimsError(f"{start}: the (d) start model is missing (its pre-training run comes first)")
        model.load_state_dict(torch.load(start, map_location="cpu", weights_only=True))
        row.update(start_float=ev(False), start_ptq=ev(True))
        salt = 1  # batches the pre-training did not draw in this order; the same for both continuations
        model.set_qat(run.kind == "cont-qat")
    sc = _stage(plan, run)
    mix = StoreMixture([data.train], [1.0], plan.seq_len, plan.batch, seed=run.seed, salt=salt)
    fp = hashlib.sha256(json.dumps(dict(plan=plan.fingerprint(), key=run.key)).encode()).hexdigest()[:16]
    t0 = time.time()
    res = train_stage(model, sc, mix, stage_dir=out / "runs" / run.key, resume="auto", fingerprint=fp,
                      tracker=_Progress(run.key, run.steps, log), progress=False, device="cpu", seed=run.seed)
    model.set_qat(False)
    row.update(train_loss=res.train_loss, seconds=round(time.time() - t0, 1))
    row["val_loss"] = ev(False)
    row["val_int4"] = ev(True)
    if run.kind == "pretrain":
        load = expert_load(model, data.val_BT1, plan.batch)
        if load:
            row.update(load)
        _save_model(model, out / "models" / f"{run.key}.pt")
    if not all(math.isfinite(v) for v in (row["val_loss"], row["val_int4"])):
        raise ClaimsError(f"{run.key}: non-finite held-out loss")
    return row


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


def run_claims(plan: Plan, corpus: str | os.PathLike, out: str | os.PathLike, log=print, tok_s: dict | None = None,
               execute_fn=None, threads: int = 1) -> dict[str, dict]:
    """Every run of the plan not yet in <out>/rows, in plan order; one row file per finished run. One process
    per folder (a lock): two would write the same checkpoints."""
    import fcntl  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".claims.lock", "w")  # noqa: SIM115  (held until this process ends)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ClaimsError(f"{out}: another `python -m train.claims` is running on this folder") from None
    try:
        return _run_locked(plan, corpus, out, log, tok_s, execute_fn, threads)
    finally:
        lock.close()


def _run_locked(plan, corpus, out: Path, log, tok_s, execute_fn, threads) -> dict[str, dict]:
    import torch  # noqa: PLC0415

    rows = read_rows(out)
    done = done_keys(plan, rows)
    todo = [r for r in plan.runs if r.key not in done]
    tok_s = tok_s or MEASURED_TOK_S
    log(f"claims: {len(plan.runs)} runs, {len(plan.runs) - len(todo)} done, {len(todo)} to run -> {out}")
    if not todo:
        return rows
    torch.use_deterministic_algorithms(True, warn_only=True)
    # one thread by default: on a shared 2-core machine a second OpenMP thread spins against other jobs
    # (bench/results/threads.md measured 2 threads at a tenth of 1 thread's speed under load)
    torch.set_num_threads(threads)
    data = open_data(corpus, plan.seq_len, plan.eval_windows)
    t_all, spent_est = time.time(), 0.0
    left_est = sum(run_seconds(plan, r, tok_s) for r in todo)
    for i, run in enumerate(todo):
        log(f"[{i + 1}/{len(todo)}] {run.key}: {run.tokens:,} tokens ({run.steps} steps)")
        row = (execute_fn or execute)(plan, run, data, out, log)
        atomic_write(rows_dir(out) / f"{run.key}.json", json.dumps(row, indent=1) + "\n")
        shutil.rmtree(out / "runs" / run.key / "ckpt", ignore_errors=True)  # the row and model are what remain
        rows[run.key] = row
        el = time.time() - t_all
        spent_est += run_seconds(plan, run, tok_s)
        # the rest of the estimate, scaled by how this session's speed compares with the recorded one
        eta = (left_est - spent_est) * el / max(spent_est, 1e-9)
        log(f"    val {row['val_loss']:.4f} int4 {row['val_int4']:.4f} ({row['seconds']:.0f} s); "
            f"{el / 3600:.2f} h so far, ~{eta / 3600:.1f} h left")
    return rows


# ------------------------------------------------------------------------------------------------------
# verdicts
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (scipy.stats.t.ppf; a table, since importing
# scipy costs seconds on a busy machine); beyond 30 the df-30 value, slightly conservative
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


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
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
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


# ------------------------------------------------------------------------------------------------------
# report
def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.4f} (1 seed)"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.4f} ± {sd:.4f} [{min(xs):.4f}, {max(xs):.4f}]"


def arm_values(rows: dict[str, dict], key_tpl: str, metric: str, seeds) -> list[float]:
    return [float(rows[key_tpl.format(s=s)][metric]) for s in seeds
            if key_tpl.format(s=s) in rows and rows[key_tpl.format(s=s)].get(metric) is not None]


D_SERIES = [("float start", "cont-qat-s{s}", "start_float"), ("PTQ INT4 of start", "cont-qat-s{s}", "start_ptq"),
            ("float continuation", "cont-float-s{s}", "val_loss"),
            ("PTQ INT4 of float cont.", "cont-float-s{s}", "val_int4"), ("QAT INT4", "cont-qat-s{s}", "val_int4")]
ARM_LABEL = {"dense": "dense", "moe": "MoE sigmoid+aux-free, shared", "softmax": "MoE softmax+LB, shared",
             "noshared": "MoE sigmoid+aux-free, no shared"}


def make_plots(rows: dict[str, dict], seeds, out_dir: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def panel(ax, series, title, ylabel):
        for i, (_label, vals) in enumerate(series):
            if vals:
                m = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                ax.errorbar([i], [m], yerr=[sd], fmt="o", color="C0", capsize=6, ms=8)
                ax.scatter([i + 0.12] * len(vals), vals, color="C1", s=14, zorder=3)
        ax.set_xticks(range(len(series)), [s[0] for s in series], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    def arm_series(arms, metric):
        return [(ARM_LABEL[a], arm_values(rows, f"pre-{a}-s{{s}}", metric, seeds)) for a in arms]

    fig, axs = plt.subplots(1, 4, figsize=(18, 4.8))
    panel(axs[0], arm_series(("dense", "moe"), "val_loss"), "(a) MoE vs dense", "held-out loss (nats/token)")
    panel(axs[1], arm_series(("softmax", "moe"), "val_loss"), "(b) router", "held-out loss")
    panel(axs[2], arm_series(("noshared", "moe"), "val_loss"), "(c) shared expert", "held-out loss")
    panel(axs[3], [(lab, arm_values(rows, k, m, seeds)) for lab, k, m in D_SERIES], "(d) INT4: QAT vs PTQ vs float",
          "held-out loss")
    fig.suptitle(f"claims at tiny scale on CPU: mean ± sd over seeds (blue), each seed (orange); seeds {list(seeds)}",
                 fontsize=10)
    fig.tight_layout()
    paths = [out_dir / "claims.png", out_dir / "claims_load.png"]
    _save_fig(fig, paths[0])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    panel(ax, arm_series(("softmax", "moe", "noshared"), "load_max_mean"), "(b) held-out expert load",
          "max / mean expert load (1 = balanced)")
    fig.tight_layout()
    _save_fig(fig, paths[1])
    plt.close(fig)
    return paths


def _save_fig(fig, path: Path) -> None:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def report_md(plan: Plan, rows: dict[str, dict], seeds) -> str:
    L = ["# Claims with controls (tiny scale, CPU)", "",
         "Generated by `python -m train.claims --report` from the rows of `python -m train.claims` (train/claims.py "
         "explains every arm). Every number is a mean over seeds ± the sample sd [min, max]; a claim's verdict "
         "is decided by the 95% t-interval of the per-seed paired difference (claimed-better minus other, "
         "lower is better): below 0 supports, above 0 contradicts, containing 0 (or < 3 seeds) cannot resolve.",
         ""]
    L += ["## Setup", "", "```", *plan_lines(plan, MEASURED_TOK_S, set(rows)), "```", "",
          f"Held-out: {plan.eval_windows} windows of {plan.seq_len} tokens evenly spaced over the corpus's held-out "
          "documents (package files held out by content hash + the three held-out plays); the same windows for "
          "every run. Seeds present: " + (", ".join(map(str, seeds)) or "none") + ".", ""]
    L += ["## Per arm", "", "| arm | active | total | held-out loss | INT4 (PTQ) loss | max/mean load | train loss |"
          " seeds |", "|---|---|---|---|---|---|---|---|"]
    for a in plan.arms:
        k = f"pre-{a}-s{{s}}"
        vals = arm_values(rows, k, "val_loss", seeds)
        if not vals:
            continue
        r0 = next(rows[k.format(s=s)] for s in seeds if k.format(s=s) in rows)
        L.append(f"| {ARM_LABEL[a]} | {r0['active_params']:,} | {r0['total_params']:,} | {_ms(vals)} | "
                 f"{_ms(arm_values(rows, k, 'val_int4', seeds))} | {_ms(arm_values(rows, k, 'load_max_mean', seeds))} |"
                 f" {_ms(arm_values(rows, k, 'train_loss', seeds))} | {len(vals)} |")
    L += ["", "(d), INT4 = g32 weights + int8 per-token activations (fake quant, the export format):", "",
          "| model | held-out loss | seeds |", "|---|---|---|"]
    for lab, k, m in D_SERIES:
        v = arm_values(rows, k, m, seeds)
        if v:
            L.append(f"| {lab} | {_ms(v)} | {len(v)} |")
    g = gap_recovered(rows, seeds)
    L += ["", f"PTQ gap recovered by QAT, naive (vs the float start, as the tiny recipe prints it): "
              f"{_ms(g['naive'])}; controlled (share of the equal-budget float continuation's PTQ gap that QAT "
              f"closes): {_ms(g['controlled'])}.", ""]
    L += ["## Verdicts", "", "| claim | paired difference (mean, 95% CI) | per seed | verdict |", "|---|---|---|---|"]
    verdicts = {}
    for c in CLAIM_TESTS:
        if c.id[0] not in plan.claims:
            continue
        v = paired_verdict(claim_diffs(c, rows, seeds))
        verdicts[c.id] = v
        ci = f"{v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] {c.unit}" if v["n"] >= 2 else \
            (f"{v['mean']:+.4f}" if v["n"] else "-")
        L.append(f"| ({c.id}) {c.text} | {ci} | {', '.join(f'{x:+.4f}' for x in v['diffs']) or '-'} | "
                 f"**{v['verdict']}** |")
    L += ["", "## What the CPU data says", ""]
    for c in CLAIM_TESTS:
        if c.id in verdicts:
            v = verdicts[c.id]
            word = v["verdict"].split(" (")[0]
            L.append(f"- ({c.id}) {c.text}: **{word}** ({v['n']} seeds)" +
                     ("." if word != "cannot resolve" else f": {v['verdict'].split('(', 1)[-1].rstrip(')')}."))
    L += ["", "Scope: d_model 64, 3 layers, 2048-token BPE, ~7M tokens per model; at phone scale the answers may "
              "differ. The (d) start model is the pre-trained MoE (no SFT data offline).", "",
          "![claims](claims.png)", "", "![expert load](claims_load.png)", ""]
    return "\n".join(L)


def write_report(plan: Plan, out: str | os.PathLike, results: str | os.PathLike = RESULTS, plots: bool = True) -> Path:
    rows = read_rows(out)
    if not rows:
        raise ClaimsError(f"{out}: no finished runs to report (run `python -m train.claims` first)")
    done_keys(plan, rows)
    seeds = [s for s in seeds_in(rows) if s in plan.seeds] or seeds_in(rows)
    res = Path(results)
    res.mkdir(parents=True, exist_ok=True)
    if plots:
        make_plots(rows, seeds, res)
    return atomic_write(res / "claims.md", report_md(plan, rows, seeds))


# ------------------------------------------------------------------------------------------------------
def measure_tok_s(plan: Plan, steps: int = 6, log=print) -> dict:
    """Time a few training steps of each speed kind on random ids (this machine, now)."""
    import torch  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415
    from train.batches import Batcher, LMSource  # noqa: PLC0415
    from train.loop import train_stage  # noqa: PLC0415

    ids = torch.randint(0, plan.arms["moe"].overrides["vocab_size"], (200_000,))
    out = {}
    for kind, arm, qat in (("dense", "dense", False), ("moe", "moe", False), ("qat", "moe", True)):
        model = MobileMoE(plan.config(arm, 0)).set_qat(qat)
        run = Run("measure", "cont-qat" if qat else "pretrain", arm, 0, plan.tokens, plan.tokens // plan.step_tokens)
        b = Batcher([LMSource(ids)], [1.0], plan.seq_len, plan.batch, 0)
        train_stage(model, _stage(plan, run), b, stage_dir=None, resume=None, progress=False, max_steps=2)
        t = time.time()
        train_stage(model, _stage(plan, run), b, stage_dir=None, resume=None, progress=False, max_steps=steps)
        out[kind] = steps * plan.step_tokens / (time.time() - t)
        log(f"measured {kind}: {out[kind]:,.0f} tok/s")
    return out


def main(argv: list[str] | None = None) -> int:
    from model import cli  # noqa: PLC0415

    ap = cli.parser("python -m train.claims", __doc__)
    ap.add_argument("--plan", action="store_true", help="print the arms, params, tokens and estimated hours; no training")
    ap.add_argument("--measure", action="store_true", help="with --plan: re-time the tokens/s here first")
    ap.add_argument("--report", action="store_true", help="write claims.md + plots from the finished rows; no training")
    ap.add_argument("--only", default=",".join(CLAIMS), metavar="a,b", help="claims to run / report")
    ap.add_argument("--seeds", default="0,1,2", metavar="0,1,2", help="seeds (>= 3 for a verdict)")
    ap.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="rows, checkpoints and models (git-ignored runs/)")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, metavar="DIR", help="`python -m train.corpus build` output")
    ap.add_argument("--results", default=str(RESULTS), metavar="DIR", help="where --report writes")
    ap.add_argument("--threads", type=cli.positive_int, default=1, metavar="N",
                    help="torch CPU threads (1: the machine is shared; the estimate assumes 1)")
    a = ap.parse_args(argv)
    claims = tuple(x for x in a.only.split(",") if x)
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in a.seeds.split(",") if x.strip()))
    except ValueError:
        raise ClaimsError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
    if any(s < 0 for s in seeds):
        raise ClaimsError(f"--seeds {a.seeds!r}: seeds must be >= 0")
    vocab = 2048
    cj = Path(a.corpus) / "corpus.json"
    if cj.is_file():
        vocab = int(json.loads(cj.read_text())["vocab_size"])
    plan = make_plan(claims, seeds, vocab=vocab)
    import torch  # noqa: PLC0415

    torch.set_num_threads(a.threads)
    if a.plan:
        tok_s = measure_tok_s(plan) if a.measure else MEASURED_TOK_S
        rows = read_rows(a.out)
        print("\n".join(plan_lines(plan, tok_s, done_keys(plan, rows) if rows else set())))
        return 0
    if a.report:
        p = write_report(plan, a.out, a.results)
        print(f"wrote {p}")
        return 0
    print("\n".join(plan_lines(plan, MEASURED_TOK_S, done_keys(plan, read_rows(a.out)))), flush=True)
    run_claims(plan, a.corpus, a.out, log=lambda s: print(s, flush=True), threads=a.threads)
    print(f"done; `python -m train.claims --report --out {a.out}` writes {a.results}/claims.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from model.cli import run

    raise SystemExit(run(main))
