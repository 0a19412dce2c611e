"""The on-device MoE scaling law: sweep -> fit -> held-out validation -> architecture optimizer -> report.

    python -m train.scaling sweep --grid cpu [--out bench/results/scaling_cpu.csv]   # resumable, row by row
    python -m train.scaling fit bench/results/scaling_cpu.csv                       # law + bootstrap CIs
    python -m train.scaling optimize --memory-gb 3 --context 2048 --active-flops 1.5e9 [--tokens 6e12]
    python -m train.scaling report                                                  # plots + scaling_v1.md
    python -m train.scaling all --grid cpu                                          # all of the above

Grid axes (every point is get_config(base, **overrides), i.e. a valid ModelConfig):
    active size  d_model (the dense FFN is 4*d; all variants of one size have the same active FFN width)
    sparsity     X = n_experts / top_k (routed expansion)
    granularity  G = dense FFN width / expert width  -> expert_ffn_dim = 4d/G, top_k = G - n_shared
    shared       n_shared_experts (a shared expert has the routed experts' width)
so that a MoE variant's active FFN = (top_k + n_shared) * expert_ffn_dim = the dense FFN: at a fixed size,
only how the FFN is split and how many spare experts exist changes. Each point trains tokens = r * active
params (rounded to whole steps). The law and its fit live in train/scaling_law.py, the optimizer in
train/scaling_opt.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import count_params, flops_per_token, get_config, int4_weight_bytes, param_breakdown

RESULTS = Path("bench/results")
DEFAULT_CSV = RESULTS / "scaling_cpu.csv"
DEFAULT_FIT = RESULTS / "scaling_fit.json"

CSV_FIELDS = [
    "name", "family", "holdout", "d_model", "n_layers", "n_heads", "ffn_dim", "n_experts", "top_k",
    "expert_ffn_dim", "n_shared_experts", "X", "G", "active_params", "total_params", "active_nonemb",
    "flops_per_token", "int4_bytes", "tokens", "val_loss", "train_loss", "seconds", "tokenizer", "seq_len",
    "batch_size", "lr", "seed", "base", "overrides",
]


# ------------------------------------------------------------------------------------------------------
# Grid
@dataclass
class GridPoint:
    name: str
    base: str
    overrides: dict
    tokens: int
    family: str  # "dense" | "moe"
    X: float
    G: float
    holdout: bool = False
    seed: int = 0  # data order (model init comes from overrides["seed"], default 0)
    meta: dict = field(default_factory=dict)

    def config(self):
        return get_config(self.base, **self.overrides)


def arch_overrides(d: int, n_layers: int, X: int = 1, G: int = 1, shared: int = 0, vocab: int = 256,
                   ffn_mult: int = 4, head_dim: int = 32, max_seq_len: int = 512) -> dict:
    """Overrides of the `tiny` preset for one grid point. X = 1 -> dense."""
    ffn = ffn_mult * d
    heads = d // head_dim
    o = dict(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, head_dim=head_dim,
             ffn_dim=ffn, max_seq_len=max_seq_len)
    if X == 1:
        o.update(n_experts=0, top_k=0, expert_ffn_dim=0, n_shared_experts=0, shared_ffn_dim=0)
        return o
    if ffn % G:
        raise ValueError(f"granularity {G} does not divide the dense FFN {ffn}")
    f = ffn // G
    k = G - shared
    if k < 1:
        raise ValueError(f"G={G} with {shared} shared expert(s) leaves no routed expert")
    o.update(n_experts=X * k, top_k=k, expert_ffn_dim=f, n_shared_experts=shared, shared_ffn_dim=f if shared else 0)
    return o


def _tokens_for(cfg, ratio: float, step_tokens: int, min_steps: int) -> int:
    _, active = count_params(cfg)
    steps = max(min_steps, math.ceil(ratio * active / step_tokens))
    return steps * step_tokens


@dataclass
class GridSpec:
    name: str
    points: list[GridPoint]
    seq_len: int
    batch_size: int
    lr: float
    tokenizer: str  # "bytes"


def cpu_grid(token_ratio: float = 1.0, seq_len: int = 64, batch_size: int = 16) -> GridSpec:
    """18 points sized for a shared, busy 2-core CPU (~40 min): a size ladder d 32/64/96 (3 layers) with dense
    + the default MoE (X=8, G=4, one shared expert) at each width; sparsity, granularity and shared-expert
    variants at fixed active size (d=64); token-budget variants at d=32 (they separate the law's N and D
    terms, which a tokens-proportional-to-size ladder alone cannot). The largest size (d=96, dense and MoE)
    is held out of the fit. Listed in run order: the ladder (held-out points included) first, so a cut-short
    sweep still validates."""
    L = 3
    step = seq_len * batch_size
    pts: list[GridPoint] = []

    def add(name, d, X=1, G=1, shared=0, tok_mult=1.0, holdout=False):
        o = arch_overrides(d, L, X, G, shared)
        cfg = get_config("tiny", **o)
        tokens = _tokens_for(cfg, token_ratio * tok_mult, step, 32)
        pts.append(GridPoint(name=name, base="tiny", overrides=o, tokens=tokens, family="dense" if X == 1 else "moe",
                             X=float(X), G=float(G), holdout=holdout))

    for d in (32, 64, 96):
        add(f"d{d}-dense", d, holdout=d == 96)
        add(f"d{d}-X8-G4-s1", d, 8, 4, 1, holdout=d == 96)
    for m in (0.5, 2.0, 4.0):
        add(f"d32-dense-T{m:g}", 32, tok_mult=m)
        add(f"d32-X8-G4-s1-T{m:g}", 32, 8, 4, 1, tok_mult=m)
    # sparsity (G=4, shared 1), then granularity / shared (X=8) at fixed active size d=64
    add("d64-X2-G4-s1", 64, 2, 4, 1)
    add("d64-X16-G4-s1", 64, 16, 4, 1)
    add("d64-X8-G4-s0", 64, 8, 4, 0)
    add("d64-X8-G1-s0", 64, 8, 1, 0)
    add("d64-X8-G8-s1", 64, 8, 8, 1)
    # a seed replicate (init and data order) of the centre's dense point: the run-to-run noise floor
    add("d64-dense-seed1", 64)
    pts[-1].overrides["seed"] = 1
    pts[-1].seed = 1
    return GridSpec("cpu", pts, seq_len, batch_size, lr=5e-3, tokenizer="bytes")


def paper_grid(token_ratio: float = 20.0) -> GridSpec:
    """The GPU grid at phone scale (d 512..1280, 12..24 layers, 49k BPE vocabulary): run it with the real
    pre-training mix on GPUs. Defined here so the same runner, CSV and fit apply; not run on CPU."""
    pts: list[GridPoint] = []
    step = 2048 * 256
    for d, L in ((512, 12), (768, 16), (1024, 20), (1280, 24)):
        for X, G, s in ((1, 1, 0), (8, 4, 1), (4, 4, 1), (16, 4, 1), (8, 1, 0), (8, 8, 1), (8, 4, 0)):
            o = arch_overrides(d, L, X, G, s, vocab=49152, head_dim=64, max_seq_len=2048)
            o["n_kv_heads"] = max(1, o["n_heads"] // 4)
            cfg = get_config("S", **o)
            pts.append(GridPoint(name=f"p{d}-" + ("dense" if X == 1 else f"X{X}-G{G}-s{s}"), base="S", overrides=o,
                                 tokens=_tokens_for(cfg, token_ratio, step, 100), family="dense" if X == 1 else "moe",
                                 X=float(X), G=float(G), holdout=d == 1280))
    return GridSpec("paper", pts, seq_len=2048, batch_size=256, lr=1e-3, tokenizer="bpe49152")


def get_grid(name: str) -> GridSpec:
    if name == "cpu":
        return cpu_grid()
    if name == "paper":
        return paper_grid()
    raise ValueError(f"unknown grid {name!r}: cpu|paper")


def point_row(p: GridPoint, spec: GridSpec) -> dict:
    """The CSV row of a point, without the training results."""
    cfg = p.config()
    total, active = count_params(cfg)
    b = param_breakdown(cfg)
    return dict(
        name=p.name, family=p.family, holdout=int(p.holdout), d_model=cfg.d_model, n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, n_experts=cfg.n_experts, top_k=cfg.top_k,
        expert_ffn_dim=cfg.expert_ffn_dim, n_shared_experts=cfg.n_shared_experts, X=p.X, G=p.G,
        active_params=active, total_params=total, active_nonemb=active - b["embedding"] - b["lm_head"],
        flops_per_token=flops_per_token(cfg, 0), int4_bytes=int4_weight_bytes(cfg)["total"], tokens=p.tokens,
        tokenizer=spec.tokenizer, seq_len=spec.seq_len, batch_size=spec.batch_size, lr=spec.lr, seed=p.seed,
        base=p.base, overrides=json.dumps(p.overrides, sort_keys=True),
    )


# ------------------------------------------------------------------------------------------------------
# CSV (atomic rewrite after every finished point: a killed sweep never leaves a torn row)
def read_csv(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"name", "val_loss", "active_nonemb", "tokens", "X", "G"} <= set(rows[0]):
        raise ValueError(f"{p}: not a scaling CSV (missing columns)")
    return rows


def write_csv_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------------
# Corpus
def byte_ids(texts: list[str]):
    import torch  # noqa: PLC0415

    data = "\n".join(texts).encode("utf-8")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64).copy())


def load_corpus(corpus: str, val_tokens: int, seq_len: int):
    """(train_ids, val_ids) as byte ids. corpus: 'shakespeare[:<root>]' (train.data's split, whole plays held
    out) or a path to a UTF-8 text file (its last 10% held out). val_ids: val_tokens bytes taken as 16 evenly
    spaced blocks of the held-out text, the same for every point (paired comparisons)."""
    if corpus.startswith("shakespeare"):
        from train.data import shakespeare_splits  # noqa: PLC0415

        root = corpus.split(":", 1)[1] if ":" in corpus else "data/shakespeare"
        train_texts, held_texts = shakespeare_splits(root)
    else:
        p = Path(corpus)
        if not p.is_file():
            raise FileNotFoundError(f"corpus {corpus}: no such file (use 'shakespeare' or a text file)")
        text = p.read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        train_texts, held_texts = [text[:cut]], [text[cut:]]
    train_ids, held_ids = byte_ids(train_texts), byte_ids(held_texts)
    if train_ids.numel() < 4 * seq_len or held_ids.numel() < seq_len + 1:
        raise ValueError(f"corpus {corpus}: too small ({train_ids.numel()} train / {held_ids.numel()} held-out bytes)")
    n_blocks = 16
    blk = max(seq_len + 1, val_tokens // n_blocks)
    if held_ids.numel() <= n_blocks * blk:
        return train_ids, held_ids
    starts = np.linspace(0, held_ids.numel() - blk, n_blocks).astype(int)
    import torch  # noqa: PLC0415

    return train_ids, torch.cat([held_ids[s:s + blk] for s in starts])


# ------------------------------------------------------------------------------------------------------
# Sweep
def run_sweep(spec: GridSpec, out_csv: str | os.PathLike, corpus: str = "shakespeare", val_tokens: int = 65536,
              only: list[str] | None = None, limit: int | None = None, threads: int | None = None,
              log=print) -> list[dict]:
    """Train every point not already in out_csv; rewrite out_csv after each. Returns all rows."""
    import torch  # noqa: PLC0415

    from model.model import MobileMoE  # noqa: PLC0415
    from train.loop import quick_pretrain  # noqa: PLC0415

    if spec.tokenizer != "bytes":
        raise ValueError(f"grid {spec.name!r} uses the {spec.tokenizer} tokenizer and the real pre-training mix "
                         "(GPUs); this runner trains byte-level points only (use --grid cpu)")
    if threads:
        torch.set_num_threads(threads)
    rows = read_csv(out_csv)
    done = {r["name"] for r in rows if r.get("val_loss")}
    todo = [p for p in spec.points if p.name not in done and (not only or p.name in only)]
    if limit is not None:
        todo = todo[:limit]
    log(f"sweep {spec.name}: {len(spec.points)} points, {len(done)} done, {len(todo)} to run -> {out_csv}")
    if not todo:
        return rows
    train_ids, val_ids = load_corpus(corpus, val_tokens, spec.seq_len)
    t_sweep = time.time()
    for i, p in enumerate(todo):
        row = point_row(p, spec)
        cfg = p.config()
        log(f"[{i + 1}/{len(todo)}] {p.name}: active {row['active_params'] / 1e3:.0f}K (non-emb "
            f"{row['active_nonemb'] / 1e3:.0f}K), total {row['total_params'] / 1e3:.0f}K, {p.tokens / 1e3:.0f}K tokens")
        model = MobileMoE(cfg)
        res = quick_pretrain(model, train_ids, val_ids, tokens=p.tokens, seq_len=spec.seq_len,
                             batch_size=spec.batch_size, lr=spec.lr, seed=p.seed, progress=False)
        if not math.isfinite(res["val_loss"]):
            raise RuntimeError(f"{p.name}: non-finite validation loss {res['val_loss']}")
        row.update(val_loss=f"{res['val_loss']:.5f}", train_loss=f"{res['train_loss']:.5f}", tokens=int(res["tokens"]),
                   seconds=f"{res['seconds']:.1f}")
        rows = [r for r in rows if r["name"] != p.name] + [row]
        write_csv_atomic(out_csv, rows)
        el = time.time() - t_sweep
        log(f"    val {res['val_loss']:.4f}  train {res['train_loss']:.4f}  {res['seconds']:.0f}s "
            f"({res['tokens'] / max(res['seconds'], 1e-9):.0f} tok/s); sweep {el / 60:.1f} min, "
            f"~{el / (i + 1) * (len(todo) - i - 1) / 60:.0f} min left")
    return rows


# ------------------------------------------------------------------------------------------------------
# Fit from a CSV
def rows_to_arrays(rows: list[dict]):
    N = np.array([float(r["active_nonemb"]) for r in rows])
    D = np.array([float(r["tokens"]) for r in rows])
    X = np.array([float(r["X"]) for r in rows])
    G = np.array([float(r["G"]) for r in rows])
    S = np.array([float(r["n_shared_experts"]) for r in rows])
    y = np.array([float(r["val_loss"]) for r in rows])
    return N, D, X, G, S, y


def fit_csv(csv_path: str | os.PathLike, n_boot: int = 100, seed: int = 0, n_starts: int = 64, log=print) -> dict:
    """Fit on the non-held-out finished rows, predict the held-out ones. Returns a JSON-able dict.
    n_starts: how many of the 64 grid starts to use (evenly subsampled; fewer = faster on a busy machine)."""
    from train.scaling_law import default_starts, fit_law, predict  # noqa: PLC0415

    rows = [r for r in read_csv(csv_path) if r.get("val_loss")]
    if not rows:
        raise ValueError(f"{csv_path}: no finished points to fit")
    train = [r for r in rows if r["holdout"] not in ("1", "True", "true")]
    held = [r for r in rows if r["holdout"] in ("1", "True", "true")]
    N, D, X, G, S, y = rows_to_arrays(train)
    t = time.time()
    grid = default_starts()
    starts = grid[::max(1, len(grid) // max(1, n_starts))]
    res = fit_law(N, D, X, G, S, y, starts=starts, n_boot=n_boot, seed=seed)
    log(f"fit: {len(train)} points, {res.starts} starts, {n_boot} bootstrap refits, {time.time() - t:.0f}s")
    p = res.params
    pred_train = predict(p, N, D, X, G, S)
    out = dict(
        form="L = E0 + A * N^-alpha * X^-delta * rho^[s>0] * (1 + g*G^-gamma) + B * D^-beta "
             "(N active non-embedding params / 1e6, D tokens / 1e6)",
        params=p.as_dict(), ci95=res.ci, n_points=len(train), n_boot=res.n_boot, n_starts=res.starts,
        huber_loss=res.loss,
        train_rmse_rel=float(np.sqrt(np.mean((pred_train / y - 1) ** 2))),
        train=[dict(name=r["name"], measured=float(r["val_loss"]), predicted=float(pp))
               for r, pp in zip(train, pred_train)],
        heldout=[],
    )
    if held:
        Nh, Dh, Xh, Gh, Sh, yh = rows_to_arrays(held)
        ph = predict(p, Nh, Dh, Xh, Gh, Sh)
        out["heldout"] = [dict(name=r["name"], measured=float(m), predicted=float(q), rel_err=float(q / m - 1))
                          for r, m, q in zip(held, yh, ph)]
    return out


def save_json_atomic(path: str | os.PathLike, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def print_fit(fit: dict, log=print) -> None:
    log(fit["form"])
    for k, v in fit["params"].items():
        lo, hi = fit["ci95"].get(k, (float("nan"), float("nan")))
        log(f"  {k:>6} = {v:9.4f}   95% CI [{lo:.4f}, {hi:.4f}]")
    log(f"  train points {fit['n_points']}, rel. RMSE {fit['train_rmse_rel'] * 100:.2f}%")
    for h in fit["heldout"]:
        log(f"  held out {h['name']}: measured {h['measured']:.4f} predicted {h['predicted']:.4f} "
            f"({h['rel_err'] * 100:+.2f}%)")


# ------------------------------------------------------------------------------------------------------
# CLI
def main(argv: list[str] | None = None) -> int:
    """The CLI; expected failures raise (model.cli.run prints them as one line, exit 2)."""
    from model import cli  # noqa: PLC0415

    ap = cli.parser("python -m train.scaling", __doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="sweep | fit | optimize | report | all")

    def sweep_args(s):
        s.add_argument("--grid", type=cli.one_of(("cpu", "paper")), default="cpu", metavar="cpu|paper",
                       help="the grid (paper: GPUs + real data; --dry-run lists it)")
        s.add_argument("--out", default=str(DEFAULT_CSV), metavar="CSV", help="results CSV (rewritten per point)")
        s.add_argument("--corpus", default="shakespeare", help="shakespeare[:root] or a UTF-8 text file")
        s.add_argument("--val-tokens", type=cli.positive_int, default=65536, metavar="N",
                       help="held-out bytes every point is evaluated on")
        s.add_argument("--only", default="", metavar="A,B", help="comma-separated point names (empty: all)")
        s.add_argument("--limit", type=cli.positive_int, default=None, metavar="N",
                       help="run at most this many unfinished points; unset: all")
        # one thread: on a shared 2-core machine two OpenMP threads per process spin against other jobs
        # (a 5 s point took minutes); on a quiet machine 2 helps little at these widths
        s.add_argument("--threads", type=cli.positive_int, default=1, metavar="N", help="torch CPU threads")
        s.add_argument("--dry-run", action="store_true", help="list the grid and exit")

    def fit_args(f):
        f.add_argument("--n-boot", type=cli.nonneg_int, default=100, metavar="N",
                       help="bootstrap refits for the 95%% CIs (0: none)")
        f.add_argument("--starts", type=cli.int_range(1, 64), default=64, metavar="N",
                       help="L-BFGS starts taken from the 64-point grid (1..64)")

    def add(name: str, help: str):
        return sub.add_parser(name, help=help, description=help, formatter_class=cli.HelpFormatter)

    s = add("sweep", "train the grid (resumable)")
    sweep_args(s)
    f = add("fit", "fit the law to a sweep CSV")
    f.add_argument("csv", nargs="?", default=str(DEFAULT_CSV), help="the sweep CSV")
    fit_args(f)
    f.add_argument("--out", default=str(DEFAULT_FIT), metavar="JSON", help="fitted-law JSON (read by optimize/report)")
    o = add("optimize", "best architecture under phone memory/compute budgets")
    from train.scaling_opt import add_optimize_args  # noqa: PLC0415

    add_optimize_args(o)
    r = add("report", "plots + bench/results/scaling_v1.md from the CSV and fit JSON")
    r.add_argument("--csv", default=str(DEFAULT_CSV), help="the sweep CSV")
    r.add_argument("--fit", default=str(DEFAULT_FIT), metavar="JSON", help="the fitted-law JSON")
    r.add_argument("--out-dir", default=str(RESULTS), metavar="DIR", help="where the plots and scaling_v1.md go")
    a = add("all", "sweep + fit + report")
    sweep_args(a)
    fit_args(a)
    args = ap.parse_args(argv)
    try:
        if args.cmd in ("sweep", "all"):
            spec = get_grid(args.grid)
            if args.dry_run:
                for p in spec.points:
                    row = point_row(p, spec)
                    print(f"{p.name:>22}  active {row['active_params']:>12,}  total {row['total_params']:>13,}  "
                          f"tokens {p.tokens:>15,}{'  (held out)' if p.holdout else ''}")
                return 0
            only = [x for x in args.only.split(",") if x] or None
            run_sweep(spec, args.out, args.corpus, args.val_tokens, only, args.limit, args.threads)
            if args.cmd == "sweep":
                return 0
            fit = fit_csv(args.out, n_boot=args.n_boot, n_starts=args.starts)
            save_json_atomic(DEFAULT_FIT, fit)
            print_fit(fit)
            from train.scaling_report import make_report  # noqa: PLC0415

            make_report(args.out, DEFAULT_FIT, RESULTS)
            return 0
        if args.cmd == "fit":
            fit = fit_csv(args.csv, n_boot=args.n_boot, n_starts=args.starts)
            save_json_atomic(args.out, fit)
            print_fit(fit)
            print(f"wrote {args.out}")
            return 0
        if args.cmd == "optimize":
            from train.scaling_opt import run_optimize  # noqa: PLC0415

            return run_optimize(args)
        if args.cmd == "report":
            from train.scaling_report import make_report  # noqa: PLC0415

            make_report(args.csv, args.fit, args.out_dir)
            return 0
    except (RuntimeError, ImportError) as e:  # a diverged point; a missing optional plotting dependency
        raise cli.BadInput(str(e)) from e
    return 0


if __name__ == "__main__":
    from model.cli import run

    raise SystemExit(run(main))
