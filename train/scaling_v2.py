"""The scaling law's v2 grid: the offline BPE corpus, a per-point learning rate, >= 2 seeds per point.

    python -m train.scaling_v2 --plan [--measure]      # every run, its tokens, LR and estimated CPU hours
    python -m train.scaling_v2 [--limit N] [--only K]  # train what is not in the CSV yet (resumable; N workers may share it)
    python -m train.scaling_v2 --report                # fit + intervals + held-out + optimizer -> bench/results/scaling.md

Data and trainer are train.claims': the offline corpus (`python -m train.corpus build`, BPE vocabulary 2048,
held-out split by document), T 128 x batch 16, AdamW WSD (2% warmup, 20% decay to LR/10), z-loss 1e-4, the
MoE points with the paper's router (sigmoid + aux-loss-free bias 1e-3 + top-k normalisation), 3 layers.
A point = a ModelConfig (train.scaling.arch_overrides of `tiny`) + tokens + LR + seed; its loss is the mean
held-out CE (nats/token) over the same EVAL_WINDOWS windows for every point.

Two phases, in this order:
  lr    LR sweep at the anchors (the smallest and the largest fitted size, dense and MoE; seed 0, 5 tokens per
        active param; the smallest size again at 40): each anchor's best LR is the vertex of the parabola in log
        LR through its lowest loss and its neighbours; a sweep lowest at an edge adds runs past it (extend_lr_sweep).
  grid  every law point at the LR rule log LR = a + b log N + c [MoE] + d log(tokens/param) + e [MoE] log N, least
        squares over the anchors' best LRs (train/scaling_v2_fit.fit_lr_rule). The largest size (d128, dense and MoE) is held
        out of the law and is not an anchor either: its LR is the rule's extrapolation, its loss unseen.
Grid axes: sizes d 32/64/96 (+ d128 held out) at 10 tokens/param, dense and MoE X8 G4 +1 shared; tokens
2.5..40 per active param at d32 (5 budgets) and d64 (3); sparsity X 2/4/16, granularity G 1/2/8 and
shared-vs-none at d64 G2/G4/G8 and d32 (10 tokens/param). Tokens per param count the embedding (as train.claims does); the law's
N is non-embedding active params (train.scaling_law).

Resumable row by row: bench/results/scaling_v2.csv is rewritten atomically after every finished run, a running
run checkpoints every CKPT_EVERY steps under runs/scaling_v2/<key>/. Parallel: start the same command N times
(one core each); every run is taken under its own lock, so the workers split the plan (train.worklist).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.atomic import atomic_write
from model.cli import BadInput
from model.config import count_params, flops_per_token, get_config, param_breakdown
from train.claims_plan import MEASURED_TOK_S
from train.scaling import arch_overrides

DEFAULT_CSV = Path("bench/results/scaling_v2.csv")
DEFAULT_RUNS = Path("runs/scaling_v2")
DEFAULT_CORPUS = "data/corpus"
N_LAYERS, SEQ_LEN, BATCH = 3, 128, 16
EVAL_WINDOWS = 512
CKPT_EVERY, LOG_EVERY = 250, 200
Z_LOSS = 1e-4
AUX_FREE = dict(router_score="sigmoid", router_bias_coeff=1e-3, norm_topk_prob=True)
ANCHOR_RATIO = 5.0
# the claims' LR (4e-3 at d64) in the middle; the small anchor also tries 1.6e-2 (small models take more)
ANCHOR_LRS = {32: (2e-3, 4e-3, 8e-3, 1.6e-2), 96: (2e-3, 4e-3, 8e-3)}
# the small anchor swept again at the grid's longest runs: the rule's duration term (the best LR falls with a
# longer run; one sweep at 5 tokens/param would set every 40-tokens/param point's LR too high)
LONG_ANCHOR = (32, 40.0)
SEEDS = (0, 1)
MAX_LR_EXT = 2  # LR-sweep runs an anchor may add past an edge of its sweep (each a factor 2 further)
# train.claims' measured tokens/s are for d64 / 3 layers / vocab 2048 / T128 x 16: other widths are scaled
# by forward FLOPs per token (an estimate; `--plan --measure` times every architecture here instead)
REF_D = 64

CSV_FIELDS = [
    "key", "phase", "point", "family", "holdout", "d_model", "n_layers", "n_experts", "top_k", "expert_ffn_dim",
    "n_shared_experts", "X", "G", "active_params", "total_params", "active_nonemb", "tokens", "ratio", "lr",
    "lr_source", "seed", "val_loss", "train_loss", "load_max_mean", "seconds", "plan",
]


class ScalingError(BadInput):
    """A v2-sweep problem printed as one line (exit 2)."""


@dataclass
class Arch:
    name: str          # e.g. "d64-X8-G4-s1", "d64-dense"
    d: int
    X: int = 1
    G: int = 1
    shared: int = 0

    @property
    def family(self) -> str:
        return "dense" if self.X == 1 else "moe"

    def overrides(self, vocab: int, n_layers: int) -> dict:
        o = arch_overrides(self.d, n_layers, self.X, self.G, self.shared, vocab=vocab, max_seq_len=512)
        return {**o, **AUX_FREE} if self.X > 1 else o


def arch(d: int, X: int = 1, G: int = 1, shared: int = 0) -> Arch:
    return Arch(f"d{d}-dense" if X == 1 else f"d{d}-X{X}-G{G}-s{shared}", d, X, G, shared)


@dataclass
class Run:
    key: str
    phase: str         # "lr" | "grid"
    arch: Arch
    ratio: float       # tokens per active param (before rounding to whole steps)
    tokens: int
    steps: int
    seed: int
    lr: float | None   # None: the LR rule's (known once the anchors are done)
    holdout: bool = False

    @property
    def point(self) -> str:
        """The law point (everything but the seed): seeds of one point are averaged."""
        return self.key.rsplit("-s", 1)[0]


@dataclass
class Plan:
    vocab: int
    n_layers: int = N_LAYERS
    seq_len: int = SEQ_LEN
    batch: int = BATCH
    eval_windows: int = EVAL_WINDOWS
    runs: list[Run] = field(default_factory=list)
    lr_base: dict[str, int] = field(default_factory=dict)  # sweep name -> LRs in its base sweep

    @property
    def step_tokens(self) -> int:
        return self.seq_len * self.batch

    def config(self, a: Arch, seed: int = 0):
        return get_config("tiny", **a.overrides(self.vocab, self.n_layers), seed=seed)

    def fingerprint(self) -> str:
        """What a row's number depends on besides its key, LR and seed: rows of another plan are refused."""
        d = dict(vocab=self.vocab, n_layers=self.n_layers, seq_len=self.seq_len, batch=self.batch,
                 eval=self.eval_windows, z=Z_LOSS, router=AUX_FREE, sched="wsd-0.02-0.2-min/10-wd0.1")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def anchors(self) -> list[Run]:
        return [r for r in self.runs if r.phase == "lr"]

    def lr_sweeps(self) -> dict[str, list[Run]]:
        """The LR-sweep runs grouped into sweeps (one architecture at one tokens-per-param), in plan order."""
        out: dict[str, list[Run]] = {}
        for r in self.anchors():
            out.setdefault(sweep_name(r.arch, r.ratio), []).append(r)
        return out


def _lr_tag(lr: float) -> str:
    return f"{lr:.3g}"


def make_plan(vocab: int = 2048, seeds=SEEDS, *, n_layers: int = N_LAYERS, seq_len: int = SEQ_LEN,
              batch: int = BATCH, eval_windows: int = EVAL_WINDOWS, sizes=(32, 64, 96), held_size: int = 128,
              center: int = 64, ladder_ratio: float = 10.0, d_small_ratios=(2.5, 5.0, 10.0, 20.0, 40.0),
              center_ratios=(2.5, 10.0, 40.0), anchor_lrs: dict | None = None,
              anchor_ratio: float = ANCHOR_RATIO, min_steps: int = 20, rows: dict | None = None,
              long_anchor: tuple | None = LONG_ANCHOR) -> Plan:
    """The v2 plan; with `rows` (the CSV so far) the LR sweep includes the runs extend_lr_sweep adds."""
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ScalingError(f"seeds {tuple(seeds)}: need distinct seeds >= 0")
    anchor_lrs = ANCHOR_LRS if anchor_lrs is None else anchor_lrs
    plan = Plan(vocab, n_layers, seq_len, batch, eval_windows)
    step = plan.step_tokens

    def add(phase, a: Arch, ratio, seed, lr=None, holdout=False):
        _, active = count_params(plan.config(a))
        steps = max(min_steps, math.ceil(ratio * active / step))
        key = run_key(phase, a, ratio, seed, lr)
        plan.runs.append(Run(key, phase, a, ratio, steps * step, steps, seed, lr, holdout))

    moe = dict(X=8, G=4, shared=1)
    sweeps = [(d, anchor_ratio, lrs) for d, lrs in anchor_lrs.items()]
    if long_anchor is not None and long_anchor[0] in anchor_lrs:
        sweeps.append((long_anchor[0], long_anchor[1], anchor_lrs[long_anchor[0]]))
    for d, ratio, lrs in sweeps:  # the LR sweep first: the rule every grid point needs comes from it
        for a in (arch(d), arch(d, **moe)):
            plan.lr_base[sweep_name(a, ratio)] = len(lrs)
            for lr in lrs:
                add("lr", a, ratio, seeds[0], lr)
    # seed-major, and within a seed the held-out points first: a cut-short sweep still validates
    for s in seeds:
        for a in (arch(held_size), arch(held_size, **moe)):
            add("grid", a, ladder_ratio, s, holdout=True)
        for d in sizes:
            ratios = d_small_ratios if d == min(sizes) else center_ratios if d == center else (ladder_ratio,)
            for a in (arch(d), arch(d, **moe)):
                for r in ratios:
                    add("grid", a, r, s)
        # shared on/off at three granularities (and at d32): one s0/s1 pair alone leaves rho unresolved when a
        # point bootstrap drops it (a synthetic 10% shared effect at 0.5% seed noise: rho's interval held 1)
        for X, G, sh in ((2, 4, 1), (4, 4, 1), (16, 4, 1), (8, 1, 0), (8, 2, 1), (8, 8, 1), (8, 4, 0), (8, 2, 0),
                         (8, 8, 0)):
            add("grid", arch(center, X, G, sh), ladder_ratio, s)
        add("grid", arch(min(sizes), 8, 4, 0), ladder_ratio, s)
    keys = [r.key for r in plan.runs]
    assert len(keys) == len(set(keys)), "duplicate run keys"
    if rows:
        extend_lr_sweep(plan, rows)
    return plan


def sweep_name(a: Arch, ratio: float) -> str:
    """An LR sweep's name, and the prefix of every run key of that architecture and duration."""
    return f"{a.name}-T{ratio:g}"


def run_key(phase: str, a: Arch, ratio: float, seed: int, lr: float | None = None) -> str:
    return sweep_name(a, ratio) + (f"-lr{_lr_tag(lr)}" if phase == "lr" else "") + f"-s{seed}"


def extend_lr_sweep(plan: Plan, rows: dict[str, dict]) -> list[Run]:
    """For every LR sweep (plan.lr_sweeps) whose finished runs have their lowest loss at the smallest or largest
    LR, add one run a factor 2 beyond that edge (at most MAX_LR_EXT a sweep): a loss still falling
    at the edge bounds the best LR, it does not locate it. Repeats while the rows already hold the added runs
    (re-planning from a CSV). Returns the runs added, each inserted after its architecture's other LR runs."""
    added = []
    for name, runs in plan.lr_sweeps().items():
        if name not in plan.lr_base:  # a hand-built plan: its sweep is what it lists
            continue
        while all(r.key in rows for r in runs) and len(runs) - plan.lr_base[name] < MAX_LR_EXT:
            losses = [float(rows[r.key]["val_loss"]) for r in runs]
            best = runs[min(range(len(runs)), key=losses.__getitem__)].lr
            lrs = [r.lr for r in runs]
            if best == max(lrs):
                lr = 2 * best
            elif best == min(lrs):
                lr = best / 2
            else:
                break
            r0 = runs[0]
            run = Run(run_key("lr", r0.arch, r0.ratio, r0.seed, lr), "lr", r0.arch, r0.ratio, r0.tokens, r0.steps,
                      r0.seed, lr)
            plan.runs.insert(plan.runs.index(runs[-1]) + 1, run)
            runs.append(run)
            added.append(run)
    return added


# ------------------------------------------------------------------------------------------------------
# time estimate
def est_tok_s(plan: Plan, a: Arch, tok_s: dict | None = None) -> float:
    """tokens/s of an architecture: a measured figure (tok_s keyed by arch name) or train.claims' d64 figure
    for its family scaled by forward FLOPs per token at seq_len."""
    if tok_s and a.name in tok_s:
        return float(tok_s[a.name])
    ref = arch(REF_D) if a.family == "dense" else arch(REF_D, 8, 4, 1)
    f_ref = flops_per_token(plan.config(ref), plan.seq_len)
    f = flops_per_token(plan.config(a), plan.seq_len)
    return MEASURED_TOK_S[a.family] * f_ref / f


def run_seconds(plan: Plan, run: Run, tok_s: dict | None = None) -> float:
    return run.tokens / est_tok_s(plan, run.arch, tok_s)


def plan_lines(plan: Plan, done: set[str] = frozenset(), tok_s: dict | None = None, lrs: dict | None = None) -> list[str]:
    """lrs: key -> (lr, source) for grid runs once the LR rule is known."""
    out = [f"scaling v2: {plan.n_layers} layers, vocab {plan.vocab}, T {plan.seq_len} x batch {plan.batch} = "
           f"{plan.step_tokens} tokens/step; {len(plan.anchors())} LR-sweep runs, "
           f"{len(plan.runs) - len(plan.anchors())} grid runs",
           f"{'key':>32} {'phase':>5} {'active':>9} {'total':>10} {'tokens':>11} {'tok/act':>7} {'lr':>9} "
           f"{'tok/s':>6} {'hours':>6}"]
    for r in plan.runs:
        total, act = count_params(plan.config(r.arch))
        lr = r.lr if r.lr is not None else (lrs or {}).get(r.key, (None, ""))[0]
        lr_s = f"{lr:.2e}" if lr is not None else "rule"
        mark = " done" if r.key in done else ""
        held = " held-out" if r.holdout else ""
        out.append(f"{r.key:>32} {r.phase:>5} {act:>9,} {total:>10,} {r.tokens:>11,} {r.tokens / act:>7.1f} "
                   f"{lr_s:>9} {est_tok_s(plan, r.arch, tok_s):>6.0f} {run_seconds(plan, r, tok_s) / 3600:>6.2f}"
                   f"{held}{mark}")
    for ph in ("lr", "grid"):
        rs = [r for r in plan.runs if r.phase == ph]
        h = sum(run_seconds(plan, r, tok_s) for r in rs) / 3600
        hl = sum(run_seconds(plan, r, tok_s) for r in rs if r.key not in done) / 3600
        out.append(f"{ph:>5}: {len(rs)} runs ({sum(r.key in done for r in rs)} done), {h:.1f} CPU hours, {hl:.1f} left")
    tot = sum(run_seconds(plan, r, tok_s) for r in plan.runs) / 3600
    left = sum(run_seconds(plan, r, tok_s) for r in plan.runs if r.key not in done) / 3600
    src = "measured here per architecture" if tok_s else (
        f"train.claims' d{REF_D} dense {MEASURED_TOK_S['dense']:,.0f} / MoE {MEASURED_TOK_S['moe']:,.0f} tok/s "
        "scaled by FLOPs/token")
    out.append(f"total {len(plan.runs)} runs, {tot:.1f} CPU hours ({left:.1f} left), 1 thread, tok/s {src}")
    return out


# ------------------------------------------------------------------------------------------------------
# CSV rows
def read_rows(path: str | os.PathLike) -> dict[str, dict]:
    p = Path(path)
    if not p.exists():
        return {}
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"key", "phase", "val_loss", "lr", "seed", "plan"} <= set(rows[0]):
        raise ScalingError(f"{p}: not a scaling_v2 CSV (missing columns)")
    return {r["key"]: r for r in rows if r.get("val_loss")}


def write_rows(path: str | os.PathLike, rows: dict[str, dict], order: list[str]) -> None:
    """Atomic rewrite, rows in plan order (rows of keys outside the plan kept at the end)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keys = [k for k in order if k in rows] + sorted(k for k in rows if k not in set(order))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for k in keys:
        w.writerow({c: rows[k].get(c, "") for c in CSV_FIELDS})
    atomic_write(p, buf.getvalue())


def done_keys(plan: Plan, rows: dict[str, dict]) -> set[str]:
    fp = plan.fingerprint()
    stale = sorted(k for k, r in rows.items() if r.get("plan") != fp)
    if stale:
        raise ScalingError(f"rows {stale[:3]}{'...' if len(stale) > 3 else ''} were made with another plan "
                           "(fingerprint differs); use a new --csv")
    return set(rows)


def grid_lrs(plan: Plan, rows: dict[str, dict]) -> tuple[dict, object]:
    """key -> (lr, source) for every grid run, and the LR rule (None until every anchor is done). A finished
    row keeps the LR it was trained with."""
    from train.scaling_v2_fit import anchor_best_lrs, fit_lr_rule  # noqa: PLC0415

    rule = None
    if all(r.key in rows for r in plan.anchors()):
        rule = fit_lr_rule(anchor_best_lrs(plan, rows))
    out = {}
    for r in plan.runs:
        if r.phase != "grid":
            continue
        if r.key in rows:
            out[r.key] = (float(rows[r.key]["lr"]), rows[r.key]["lr_source"])
        elif rule is not None:
            _, act = count_params(plan.config(r.arch))
            out[r.key] = (rule.lr(act, r.arch.family == "moe", r.ratio), "rule")
    return out, rule


# ------------------------------------------------------------------------------------------------------
# one run
def execute(plan: Plan, run: Run, lr: float, data, runs_dir: Path, log=print) -> dict:
    """Train one run (resuming its checkpoint) and return its row (without lr_source)."""
    import torch  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415
    from train.claims_run import _Progress, expert_load, logged_train_seconds  # noqa: PLC0415
    from train.loop import StageConfig, evaluate, train_stage  # noqa: PLC0415
    from train.store import StoreMixture  # noqa: PLC0415

    cfg = plan.config(run.arch, run.seed)
    if cfg.vocab_size < data.vocab:
        raise ScalingError(f"the corpus vocabulary {data.vocab} exceeds the model's {cfg.vocab_size}")
    model = MobileMoE(cfg)
    total, active = count_params(cfg)
    b = param_breakdown(cfg)
    sc = StageConfig(name=run.key, kind="pretrain", tokens=run.tokens, seq_len=plan.seq_len, global_batch=plan.batch,
                     micro_batch=plan.batch, lr=lr, min_lr=lr / 10, schedule="wsd", warmup_frac=0.02, decay_frac=0.2,
                     weight_decay=0.1, lb_loss_weight=0.0, z_loss_weight=Z_LOSS, ckpt_every=CKPT_EVERY,
                     log_every=LOG_EVERY, grad_clip=1.0, betas=(0.9, 0.95))
    mix = StoreMixture([data.train], [1.0], plan.seq_len, plan.batch, seed=run.seed)
    fp = hashlib.sha256(json.dumps(dict(plan=plan.fingerprint(), key=run.key, lr=lr)).encode()).hexdigest()[:16]
    t0 = time.time()
    res = train_stage(model, sc, mix, stage_dir=runs_dir / run.key, resume="auto", fingerprint=fp,
                      tracker=_Progress(run.key, run.steps, log), progress=False, device="cpu", seed=run.seed)
    val = evaluate(model, data.val_BT1, torch.ones(data.val_BT1.shape[0], plan.seq_len, dtype=torch.long),
                   plan.batch, "cpu")
    if not math.isfinite(val):
        raise ScalingError(f"{run.key}: non-finite held-out loss (LR {lr:.2e} diverged?)")
    load = expert_load(model, data.val_BT1, plan.batch)
    seconds = logged_train_seconds(runs_dir / run.key, plan.step_tokens, time.time() - t0)
    a = run.arch
    return dict(key=run.key, phase=run.phase, point=run.point, family=a.family, holdout=int(run.holdout), d_model=a.d,
                n_layers=plan.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k, expert_ffn_dim=cfg.expert_ffn_dim,
                n_shared_experts=cfg.n_shared_experts, X=a.X, G=a.G, active_params=active, total_params=total,
                active_nonemb=active - b["embedding"] - b["lm_head"], tokens=run.tokens, ratio=run.ratio,
                lr=f"{lr:.6g}", seed=run.seed, val_loss=f"{val:.5f}", train_loss=f"{res.train_loss:.5f}",
                load_max_mean=f"{load['load_max_mean']:.4f}" if load else "", seconds=f"{seconds:.1f}",
                plan=plan.fingerprint())


def run_sweep(plan: Plan, corpus, csv_path, runs_dir=DEFAULT_RUNS, only: set[str] | None = None,
              limit: int | None = None, threads: int = 1, log=print, execute_fn=None,
              poll_s: float = 20.0) -> dict[str, dict]:
    """Every run not yet in the CSV, in plan order (at most `limit` of them in this process). Several
    processes may share one CSV: each run is taken under its own lock in <runs_dir>/locks (train.worklist),
    and each finished row is merged into the CSV under a short lock (re-read, add, atomic rewrite).
    Two phases: the LR sweep, re-planned after every run (an optimum at a sweep's edge adds a run past it,
    extend_lr_sweep) and waited for while other workers finish its last runs; then the grid at the LR rule."""
    csv_path, runs_dir = Path(csv_path), Path(runs_dir)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(csv_path)
    done = done_keys(plan, rows)
    extend_lr_sweep(plan, rows)
    unknown = sorted((only or set()) - {r.key for r in plan.runs})
    if unknown:
        raise ScalingError(f"--only: unknown run key(s) {unknown[:3]} (see --plan)")

    def chosen(r: Run) -> bool:
        return r.key not in rows and (not only or r.key in only)

    n_todo = sum(chosen(r) for r in plan.runs)
    log(f"scaling v2: {len(plan.runs)} runs, {len(done)} done, {n_todo if limit is None else min(limit, n_todo)}"
        f" to run here -> {csv_path}")
    if not n_todo:
        return rows
    data = None
    if execute_fn is None:
        import torch  # noqa: PLC0415

        from train.claims_run import open_data  # noqa: PLC0415

        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(threads)
        data = open_data(corpus, plan.seq_len, plan.eval_windows)
    w = _Worker(plan, csv_path, runs_dir, data, log, execute_fn or execute)
    waited = False
    while limit is None or w.n < limit:  # phase 1: the LR sweep
        rows = read_rows(csv_path)
        extend_lr_sweep(plan, rows)
        left = [r for r in plan.anchors() if r.key not in rows]
        mine = [r for r in left if chosen(r)]
        if not mine:
            break
        if w.take_one(mine):
            waited = False
            continue
        if not waited:  # every LR run left is held by another worker: their losses decide the grid's LRs
            log(f"scaling v2: the LR sweep's last {len(left)} run(s) are held by other workers; waiting")
            waited = True
        time.sleep(poll_s)
    if limit is not None and w.n >= limit:
        return read_rows(csv_path)
    rows = read_rows(csv_path)
    grid = [r for r in plan.runs if r.phase == "grid" and chosen(r)]
    if grid:
        missing = [r.key for r in plan.anchors() if r.key not in rows]
        if missing:
            raise ScalingError(f"{grid[0].key} needs the LR rule: {len(missing)} LR-sweep run(s) not done yet "
                               f"(e.g. {missing[0]}); run them first")
        while limit is None or w.n < limit:  # phase 2: the grid
            if not w.take_one(grid):
                break
    return read_rows(csv_path)


class _Worker:
    """Takes one run at a time under its lock, trains it at its LR and merges its row into the CSV."""

    def __init__(self, plan, csv_path: Path, runs_dir: Path, data, log, execute_fn):
        self.plan, self.csv_path, self.runs_dir, self.data, self.log, self.execute = \
            plan, csv_path, runs_dir, data, log, execute_fn
        self.n, self.t0 = 0, time.time()

    def take_one(self, runs: list[Run]) -> bool:
        """Train the first of `runs` that is neither done nor held by another worker; False if none is."""
        import shutil  # noqa: PLC0415

        from train.worklist import held, take_runs  # noqa: PLC0415

        csv_path = self.csv_path
        for run in take_runs(runs, self.runs_dir / "locks", lambda r: r.key, lambda r: r.key in read_rows(csv_path),
                             log=lambda *_: None):
            if run.lr is not None:
                lr, src = run.lr, "sweep"
            else:
                lrs, rule = grid_lrs(self.plan, read_rows(csv_path))
                lr, src = lrs[run.key][0], rule.describe()
            self.n += 1
            self.log(f"[{self.n}] {run.key}: {run.tokens:,} tokens ({run.steps} steps), LR {lr:.2e} ({src})")
            row = self.execute(self.plan, run, lr, self.data, self.runs_dir, self.log)
            row["lr_source"] = src
            with held(csv_path.parent / f".{csv_path.name}.lock"):  # other workers write too: merge
                rows = read_rows(csv_path)
                rows[run.key] = row
                write_rows(csv_path, rows, [r.key for r in self.plan.runs])
            shutil.rmtree(self.runs_dir / run.key / "ckpt", ignore_errors=True)  # the row is what remains
            self.log(f"    val {float(row['val_loss']):.4f} ({float(row['seconds']):.0f} s); "
                     f"{(time.time() - self.t0) / 3600:.2f} h this session, {len(rows)} rows in the CSV")
            return True
        return False


def measure_tok_s(plan: Plan, steps: int = 4, log=print) -> dict:
    """Time a few training steps of every architecture of the plan on random ids (this machine, now)."""
    import torch  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415
    from train.batches import Batcher, LMSource  # noqa: PLC0415
    from train.loop import StageConfig, train_stage  # noqa: PLC0415

    ids = torch.randint(0, plan.vocab, (200_000,))
    out = {}
    for a in {r.arch.name: r.arch for r in plan.runs}.values():
        model = MobileMoE(plan.config(a))
        sc = StageConfig(name="measure", tokens=10**9, seq_len=plan.seq_len, global_batch=plan.batch,
                         micro_batch=plan.batch, lr=1e-3, lb_loss_weight=0.0, z_loss_weight=Z_LOSS)
        b = Batcher([LMSource(ids)], [1.0], plan.seq_len, plan.batch, 0)
        train_stage(model, sc, b, stage_dir=None, resume=None, progress=False, max_steps=1)
        t = time.time()
        train_stage(model, sc, b, stage_dir=None, resume=None, progress=False, max_steps=steps)
        out[a.name] = steps * plan.step_tokens / (time.time() - t)
        log(f"measured {a.name}: {out[a.name]:,.0f} tok/s")
    return out


# ------------------------------------------------------------------------------------------------------
# CLI
def main(argv: list[str] | None = None) -> int:
    from model import cli  # noqa: PLC0415

    ap = cli.parser("python -m train.scaling_v2", __doc__)
    ap.add_argument("--plan", action="store_true", help="print every run, tokens, LR and estimated hours; no training")
    ap.add_argument("--measure", action="store_true", help="with --plan: time every architecture here first")
    ap.add_argument("--report", action="store_true", help="fit the finished rows and write the report; no training")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), metavar="CSV", help="the results CSV (rewritten per run)")
    ap.add_argument("--runs", default=str(DEFAULT_RUNS), metavar="DIR", help="per-run checkpoints (git-ignored)")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, metavar="DIR", help="`python -m train.corpus build` output")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), metavar="0,1", help="grid seeds (>= 2)")
    ap.add_argument("--only", default="", metavar="K1,K2", help="run only these keys (see --plan)")
    ap.add_argument("--limit", type=cli.positive_int, default=None, metavar="N", help="run at most N runs")
    ap.add_argument("--threads", type=cli.positive_int, default=1, metavar="N", help="torch CPU threads")
    ap.add_argument("--n-boot", type=cli.nonneg_int, default=200, metavar="N", help="--report: bootstrap refits")
    ap.add_argument("--md", default="bench/results/scaling.md", metavar="MD", help="--report: the report file")
    a = ap.parse_args(argv)
    try:
        seeds = tuple(int(x) for x in a.seeds.split(",") if x.strip())
    except ValueError:
        raise ScalingError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
    vocab = 2048
    cj = Path(a.corpus) / "corpus.json"
    if cj.is_file():
        vocab = int(json.loads(cj.read_text())["vocab_size"])
    rows = read_rows(a.csv)
    plan = make_plan(vocab, seeds, rows=rows)
    done = done_keys(plan, rows)
    if a.plan:
        import torch  # noqa: PLC0415

        torch.set_num_threads(a.threads)
        tok_s = measure_tok_s(plan) if a.measure else None
        lrs, _ = grid_lrs(plan, rows)
        print("\n".join(plan_lines(plan, done, tok_s, lrs)))
        return 0
    if a.report:
        from train.scaling_v2_fit import write_report  # noqa: PLC0415

        print(f"wrote {write_report(plan, rows, a.md, n_boot=a.n_boot)}")
        return 0
    only = {x for x in a.only.split(",") if x} or None
    run_sweep(plan, a.corpus, a.csv, a.runs, only, a.limit, a.threads, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    from model.cli import run

    raise SystemExit(run(main))
