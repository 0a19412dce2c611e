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
Parallel: start the same command N times on one --out (one core each); every run is taken under its own lock in
<out>/locks/, so the workers split the plan, and a (d) continuation waits for its pre-trained model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from train.claims_plan import CLAIMS, MEASURED_TOK_S, ClaimsError, done_keys, make_plan, plan_lines, read_rows
from train.claims_report import RESULTS, write_report
from train.claims_run import measure_tok_s, run_claims

DEFAULT_OUT = "runs/claims"
DEFAULT_CORPUS = "data/corpus"


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
