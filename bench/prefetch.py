"""Next-layer expert prefetch (Engine(prefetch=True), mmoe-run --prefetch) against the same run without it: decode
hit rate, prefetch accuracy (used / issued), stall and decode tok/s, in interleaved off/on repeats.

    python -m bench.prefetch --model S-random.mmoe --slots 23 --random-ids [--repeats 2] [--out rows.json]
    python -m bench.prefetch --model trained_tiny/model.mmoe --slots 4 --prompt "To be, or not to be"

Each run opens its own Engine with N slots a layer (the probed minimum + the further slots + half a slot a
layer, as bench.streaming does), prefills the prompt, resets the cache counters, then times decode steps. A
random model is fed fixed random ids (--random-ids: its own samples loop on one or two tokens, which flatters
the cache); a trained model feeds back its samples (fixed seed; the logits are bit-identical with and without
prefetch, so both runs decode the same tokens, which is checked). Hit rates and bytes depend only on the
routing, except that a prefetch read no I/O thread had started when its layer began is cancelled, so prefetch
rows move a little with timing; tok/s on a shared machine is noisy.
"""

from __future__ import annotations

import ctypes
import json
import time

import numpy as np

from mobile.engine import CACHE_POLICIES, DEFAULT_CACHE_POLICY, Engine, MiB
from model import cli
from model.atomic import atomic_write


def build_parser():
    p = cli.parser("python -m bench.prefetch", __doc__)
    p.add_argument("--model", required=True, help=".mmoe file")
    p.add_argument("--slots", type=cli.int_range(1), required=True, help="expert slots a layer (>= top_k)")
    p.add_argument("--policy", type=cli.one_of(CACHE_POLICIES), default=DEFAULT_CACHE_POLICY,
                   help=f"cache policy ({cli.choices(CACHE_POLICIES)})")
    p.add_argument("--random-ids", action="store_true", help="random prompt ids and fixed random decode ids")
    p.add_argument("--prompt", default="To be, or not to be, that is the question:\nWhether 'tis nobler in the mind "
                   "to suffer", help="prompt text (without --random-ids)")
    p.add_argument("--prompt-tokens", type=cli.int_range(1), default=64, help="random prompt ids (--random-ids)")
    p.add_argument("--decode-tokens", type=cli.int_range(1), default=64, help="timed decode steps")
    p.add_argument("--repeats", type=cli.int_range(1), default=2, help="off/on pairs, alternating which goes first")
    p.add_argument("--threads", type=cli.int_range(1, 64), default=2, help="compute threads")
    p.add_argument("--io-threads", type=cli.int_range(1, 16), default=2, help="expert-read threads")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="prompt / decode id and sampling seed")
    p.add_argument("--out", default=None, help="write the rows as JSON here (atomic)")
    return p


def _open(a, ctx: int, prefetch: bool) -> Engine:
    """An Engine with exactly --slots slots a layer. The engine's budget counts this process's RSS at open, which
    drifts between opens by more than a small model's slot: the budget is corrected until the count is right."""
    with Engine(a.model, threads=a.threads, max_ctx=ctx, mem_budget_mb=1 << 20, io_threads=a.io_threads) as eng:
        cs, k = eng.cache_stats(), eng.info("top_k")
        if not k <= a.slots <= eng.n_experts:
            raise cli.BadInput(f"--slots {a.slots}: must be in [top_k {k}, n_experts {eng.n_experts}] for {a.model}")
    per_slot = cs["slot_bytes"] * cs["moe_layers"] / MiB
    budget = cs["min_budget_mb"] + (a.slots - k + 0.5) * per_slot
    for _ in range(8):
        try:
            eng = Engine(a.model, threads=a.threads, max_ctx=ctx, mem_budget_mb=budget, cache_policy=a.policy,
                         io_threads=a.io_threads, prefetch=prefetch)
        except ValueError:  # below the minimum after the drift
            budget += per_slot
            continue
        got = eng.cache_stats()["slots_per_layer"]
        if got == a.slots:
            return eng
        eng.close()
        budget += (a.slots - got) * per_slot
    raise RuntimeError(f"could not size a budget for {a.slots} slots a layer")


def run_one(a, prefetch: bool) -> dict:
    ctx = (a.prompt_tokens if a.random_ids else 512) + a.decode_tokens + 1
    with _open(a, ctx, prefetch) as eng:
        rng_np = np.random.default_rng(a.seed)
        if a.random_ids:
            prompt = [int(x) for x in rng_np.integers(0, eng.vocab_size, a.prompt_tokens)]
            forced = [int(x) for x in rng_np.integers(0, eng.vocab_size, a.decode_tokens)]
        else:
            prompt, forced = eng.tokenize(a.prompt), None
            if len(prompt) + a.decode_tokens >= ctx:
                raise cli.BadInput(f"--prompt: {len(prompt)} tokens, over the 512 this bench sizes for")
        rng = ctypes.c_uint64(eng.lib.mmoe_rng_seed(a.seed))
        logits = eng.eval(prompt)
        eng.cache_stats_reset()
        ids = [eng.sample(logits, 0.8, 0.95, rng)]
        t0 = time.perf_counter()
        for i in range(a.decode_tokens):
            logits = eng.eval([forced[i] if forced else ids[-1]])
            ids.append(eng.sample(logits, 0.8, 0.95, rng))
        dt = time.perf_counter() - t0
        cs = eng.cache_stats()
    return dict(prefetch=prefetch, slots=a.slots, policy=a.policy, decode_tokens=a.decode_tokens,
                decode_tok_s=a.decode_tokens / dt, hit_rate=cs["hit_rate"], mb_read=cs["bytes_read"] / MiB,
                stall_s=cs["stall_s"], read_s=cs["read_s"], issued=cs["prefetch_issued"], used=cs["prefetch_used"],
                wasted=cs["prefetch_wasted"], cancelled=cs["prefetch_cancelled"],
                accuracy=cs["prefetch_accuracy"], ids_hash=hash(tuple(ids)))


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    rows = []
    for r in range(a.repeats):
        for pf in ((False, True) if r % 2 == 0 else (True, False)):
            row = run_one(a, pf)
            rows.append(row)
            print(f"prefetch {'on ' if pf else 'off'} hit {100 * row['hit_rate']:5.1f}%  read {row['mb_read']:7.1f} MB"
                  f"  stall {row['stall_s']:6.3f} s  {row['decode_tok_s']:6.2f} tok/s  issued {row['issued']} used "
                  f"{row['used']} ({100 * row['accuracy']:.1f}%) wasted {row['wasted']} cancelled {row['cancelled']}",
                  flush=True)
    if len({row["ids_hash"] for row in rows}) != 1:
        raise RuntimeError("decoded tokens differ between runs: the outputs are not bit-identical")
    if a.out:
        atomic_write(a.out, json.dumps(dict(model=a.model, rows=rows), indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
