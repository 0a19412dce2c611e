"""train.claims' runs: the held-out data, one run (train_stage, resuming its checkpoint, then the held-out
losses and expert load), the resumable loop over a plan under a folder lock, and the tokens/s timing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from model.atomic import atomic_write
from model.config import count_params
from train.claims_plan import (
    CKPT_EVERY,
    CONT_LR,
    EVAL_WINDOWS,
    LOG_EVERY,
    MEASURED_TOK_S,
    ClaimsError,
    Plan,
    Run,
    done_keys,
    read_rows,
    rows_dir,
    run_seconds,
)


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


def logged_train_seconds(stage_dir: Path, tokens_per_step: int, fallback: float) -> float:
    """The run's training time summed over every process that worked on it: a resumed run's own wall clock
    would count only its last process. From the step records of log.jsonl (train_stage keeps those before the
    resume point); `fallback` when the log has none."""
    path = Path(stage_dir) / "log.jsonl"
    total = 0.0
    try:
        for ln in path.read_text().splitlines():
            if ln.strip():
                tps = float(json.loads(ln).get("tokens_per_s") or 0.0)
                total += tokens_per_step / tps if tps > 0 else 0.0
    except (OSError, ValueError):
        return fallback
    return total if total > 0 else fallback


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
    row.update(train_loss=res.train_loss, seconds=round(logged_train_seconds(
        out / "runs" / run.key, plan.step_tokens, time.time() - t0), 1))
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



def run_claims(plan: Plan, corpus: str | os.PathLike, out: str | os.PathLike, log=print, tok_s: dict | None = None,
               execute_fn=None, threads: int = 1, poll_s: float = 20.0) -> dict[str, dict]:
    """Every run of the plan not yet in <out>/rows, in plan order; one row file per finished run. Several
    processes may share the folder: each run is taken under its own lock (train.worklist), and a (d)
    continuation waits for its pre-trained model, so N workers split the plan N ways."""
    import torch  # noqa: PLC0415

    from train.worklist import take_runs  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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

    def is_done(run: Run) -> bool:
        return (rows_dir(out) / f"{run.key}.json").is_file()

    def needs(run: Run) -> list[str]:
        return [] if run.kind == "pretrain" else [f"pre-{run.arm}-s{run.seed}"]

    for i, run in enumerate(take_runs(todo, out / "locks", lambda r: r.key, is_done, needs, poll_s, log)):
        log(f"[{i + 1}] {run.key}: {run.tokens:,} tokens ({run.steps} steps)")
        row = (execute_fn or execute)(plan, run, data, out, log)
        atomic_write(rows_dir(out) / f"{run.key}.json", json.dumps(row, indent=1) + "\n")
        shutil.rmtree(out / "runs" / run.key / "ckpt", ignore_errors=True)  # the row and model are what remain
        el = time.time() - t_all
        spent_est += run_seconds(plan, run, tok_s)
        # the rest of the estimate, scaled by how this session's speed compares with the recorded one
        left = [r for r in todo if not is_done(r)]
        eta = sum(run_seconds(plan, r, tok_s) for r in left) * el / max(spent_est, 1e-9)
        log(f"    val {row['val_loss']:.4f} int4 {row['val_int4']:.4f} ({row['seconds']:.0f} s); "
            f"{el / 3600:.2f} h so far, {len(left)} run(s) left in the plan, ~{eta / 3600:.1f} CPU h at this speed")
    return read_rows(out)



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
