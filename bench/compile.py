"""What torch.compile buys on a CPU train step: eager vs torch.compile(model) steps/s  (python -m bench.compile).

One train step = train.loop.forward_loss (CE over the batch) + the model's aux loss, backward, grad clip, AdamW
step, router-bias update: the loop's own step, with the model
  eager      as trained today;
  eager-op   eager, but the routed experts called through the custom op mobilemoe::moe_experts (kernels/moe.py),
             whose backward recomputes the expert forward: the extra work the compiled model does;
  compiled   torch.compile(model) (default inductor, fullgraph=True, so a graph break anywhere in the model
             raises here, naming where); under compile the experts always run through the op.
compiled / eager-op is what compilation itself buys; compiled / eager is the net effect on a train step.

Three models with the same init and their own AdamW; after one warm-up step each (the compiled model's first
step is the compile, timed separately) they alternate blocks of --steps steps for --repeats rounds, so drift on
a shared machine hits all alike; reported: median steps/s of the blocks. With --threads 1 (the default) the
clock is time.thread_time, the CPU time of this thread, which a loaded machine does not inflate; wall steps/s
are printed too. The first-step losses of the two models (same weights, same batch) are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _step(model, inner, opt, ids_BT1, mask_BT):
    from train.loop import forward_loss  # noqa: PLC0415

    s, n = forward_loss(model, ids_BT1, mask_BT, "cpu")
    loss = s / n + inner.aux_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(inner.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    inner.update_router_bias()
    return loss.detach()


@contextlib.contextmanager
def _experts_through_op():
    """model.model's moe_experts replaced by a direct call of the custom op (eager-op), restored on exit so the
    compiled model's guards on that global still hold."""
    import kernels.moe as kmoe  # noqa: PLC0415
    import model.model as mm  # noqa: PLC0415

    def via_op(x, ids, gates, w13, w2, backend="auto", act_fq=None):
        name = kmoe.act_fq_name(act_fq)
        if name is None:
            raise RuntimeError("eager-op: act_fq has no importable name")
        return kmoe.moe_experts_op(x, ids, gates, w13, w2, kmoe.resolve_backend(backend, x.device), name)

    real = mm.moe_experts
    mm.moe_experts = via_op
    try:
        yield
    finally:
        mm.moe_experts = real


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=_positive, default=8)
    ap.add_argument("--seq", type=_positive, default=128)
    ap.add_argument("--steps", type=_positive, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=_positive, default=5, help="interleaved eager/compiled block pairs")
    ap.add_argument("--threads", type=_positive, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="model/precision.py policy (bf16 = the CPU twin of the CUDA policy)")
    ap.add_argument("--qat", action="store_true", help="QAT fake-quant on (stage 3's step)")
    ap.add_argument("--compile-backend", default="inductor")
    args = ap.parse_args(argv)

    from model.config import PRESETS, get_config  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415
    from model.precision import POLICIES  # noqa: PLC0415

    if args.preset not in PRESETS:
        print(f"error: unknown preset {args.preset!r}: {'|'.join(PRESETS)}", file=sys.stderr)
        return 2
    cfg = get_config(args.preset)
    if args.seq > cfg.max_seq_len:
        print(f"error: --seq {args.seq} exceeds the preset's max_seq_len {cfg.max_seq_len}", file=sys.stderr)
        return 2
    if args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        print(f"error: unknown --compile-backend {args.compile_backend!r}: "
              f"{'|'.join(torch._dynamo.list_backends(exclude_tags=()))}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter

    def build():
        m = MobileMoE(cfg).set_precision(POLICIES[args.precision]).set_qat(args.qat)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    mask = torch.ones(args.batch, args.seq)
    (m_e, opt_e), (m_o, opt_o), (m_c, opt_c) = build(), build(), build()
    compiled = torch.compile(m_c, fullgraph=True, backend=args.compile_backend)
    loss_e = _step(m_e, m_e, opt_e, batches[0], mask)  # eager first: the one-time logs dynamo cannot trace
    with _experts_through_op():
        loss_o = _step(m_o, m_o, opt_o, batches[0], mask)
    t0 = time.perf_counter()
    loss_c = _step(compiled, m_c, opt_c, batches[0], mask)
    compile_s = time.perf_counter() - t0
    n_tok = args.batch * args.seq
    print(f"{args.preset} B={args.batch} T={args.seq} threads={args.threads} precision={args.precision} "
          f"qat={args.qat} backend={args.compile_backend}: torch {torch.__version__}")
    print(f"first step: eager loss {float(loss_e):.7f}, eager-op {float(loss_o):.7f}, compiled {float(loss_c):.7f} "
          f"(|compiled - eager| {abs(float(loss_e) - float(loss_c)):.2e}); compile + first step {compile_s:.1f} s wall")

    runs = {"eager": (m_e, m_e, opt_e), "eager-op": (m_o, m_o, opt_o), "compiled": (compiled, m_c, opt_c)}
    rate = {k: [] for k in runs}
    wall = {k: [] for k in runs}
    i = 1
    for _ in range(args.repeats):
        for k, (model, inner, opt) in runs.items():
            ctx = _experts_through_op() if k == "eager-op" else contextlib.nullcontext()
            t, w = clock(), time.perf_counter()
            with ctx:
                for j in range(args.steps):
                    _step(model, inner, opt, batches[(i + j) % len(batches)], mask)
            rate[k].append(args.steps / (clock() - t))
            wall[k].append(args.steps / (time.perf_counter() - w))
        i += args.steps
    med = {k: statistics.median(v) for k, v in rate.items()}
    for k in runs:
        print(f"  {k:9s} {med[k]:7.2f} steps/s  ({med[k] * n_tok:8.0f} tok/s; wall {statistics.median(wall[k]):.2f}"
              f" steps/s; blocks {' '.join(f'{r:.2f}' for r in rate[k])})")
    print(f"compiled / eager: {med['compiled'] / med['eager']:.2f}x   compiled / eager-op: "
          f"{med['compiled'] / med['eager-op']:.2f}x   eager-op / eager: {med['eager-op'] / med['eager']:.2f}x")
    from torch._dynamo.utils import counters  # noqa: PLC0415

    print(f"dynamo: {counters['stats']['unique_graphs']} graph(s), {counters['stats']['calls_captured']} ops "
          f"captured, recompiles {sum(counters['recompiles'].values())}, graph breaks "
          f"{sum(counters['graph_break'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
