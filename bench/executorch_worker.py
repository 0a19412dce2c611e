"""The ExecuTorch side of bench.executorch_peer. Runs in the executorch venv (bench/.venv-executorch, `make
bench-executorch` makes it), never in the main one: the driver starts it as a subprocess.

    python bench/executorch_worker.py export --size S --seed 0 --max-ctx 1024 --form kvcache --out S.pte
    python bench/executorch_worker.py time --pte S.pte --threads 2 --plan '{"prompts": [128, 512], ...}'

export prints one JSON line: {"ok": true, "steps": {step: seconds}, ...} or {"ok": false, "failed_step": ...,
"error": ...} (exit 3) naming the step that failed: build, quantize (torchao 8da4w: int8 dynamic per-token
activations, int4 weights in groups of 32; the llama example's `-qmode 8da4w -G 32`), torch.export,
to_edge_transform_and_lower (XnnpackPartitioner), to_executorch, save. --form native exports MobileMoE.forward
itself (no cache; its MoE through kernels.moe), kvcache exports bench/executorch_model.KVCacheLM.

time prints one JSON line with bench.mobile_driver.worker's keys (engine, threads, load_s, prefill, decode,
peak_rss_mb, ...), measured the same way: a one-token warm-up, then prefill of each prompt from an empty cache
(one forward of T tokens), then decode of N single-token forwards from context 0, ids from the plan's seed.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("build", "quantize", "torch.export", "to_edge_transform_and_lower", "to_executorch", "save")


def _one_line(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:600]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _quantize_8da4w(model, group: int = 32):
    """The llama example's 8da4w: every nn.Linear whose input width is a multiple of the group, except the
    router (fp32 in our model and engine); the token embedding INT4 g32 weight-only (the example's -E 4,32)."""
    import torch  # noqa: PLC0415
    import torch.nn as nn  # noqa: PLC0415
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_  # noqa: PLC0415
    from torchao.quantization.granularity import PerGroup  # noqa: PLC0415

    def linear(m, fqn):
        return isinstance(m, nn.Linear) and "router" not in fqn.split(".") and m.in_features % group == 0

    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)),
              filter_fn=linear)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return model


def export(size: str, seed: int, max_ctx: int, form: str, out: str, max_prefill: int) -> dict:
    import torch  # noqa: PLC0415

    res: dict = dict(size=size, seed=seed, form=form, max_ctx=max_ctx, steps={}, ok=False)
    step = "build"
    t = time.perf_counter()

    def done(name):
        nonlocal t
        res["steps"][name] = round(time.perf_counter() - t, 2)
        print(f"[executorch_worker] {size} {form}: {name} {res['steps'][name]:.1f} s", file=sys.stderr, flush=True)
        t = time.perf_counter()

    try:
        from bench.executorch_model import KVCacheLM, random_mobilemoe  # noqa: PLC0415

        with torch.no_grad():
            m = random_mobilemoe(size, seed)
            model = KVCacheLM(m, max_ctx).eval() if form == "kvcache" else m
            del m
        done(step)
        step = "quantize"
        with torch.no_grad():
            model = _quantize_8da4w(model)
        done(step)
        step = "torch.export"
        if form == "kvcache":
            T = torch.export.Dim("T", min=1, max=max_prefill)
            args = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
            dyn = ({1: T}, {0: T})
        else:
            T = torch.export.Dim("T", min=2, max=max_prefill)
            args, dyn = (torch.zeros(1, 2, dtype=torch.long),), ({1: T},)
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=dyn, strict=False)
        done(step)
        step = "to_edge_transform_and_lower"
        import executorch.kernels.quantized  # noqa: F401, PLC0415  (embedding_4bit's out variant for quant fusion)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: PLC0415
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower  # noqa: PLC0415

        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        del ep
        res["ops_outside_xnnpack"] = _non_delegated_ops(edge)
        done(step)
        step = "to_executorch"
        from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass  # noqa: PLC0415
        from executorch.exir.capture._config import ExecutorchBackendConfig  # noqa: PLC0415
        from executorch.exir.passes import MemoryPlanningPass  # noqa: PLC0415
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass  # noqa: PLC0415

        # the llama example's LLMEdgeManager.to_executorch: quant fusion turns the INT4 embedding's
        # dequantize_affine + embedding into quantized_decomposed::embedding_4bit (no out variant otherwise), and
        # memory is planned for the dynamic token dimension's upper bound, not for the 2-token example input
        edge = edge.transform([ConvertToLinearPass()])
        prog = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
        done(step)
        step = "save"
        tmp = Path(out).with_suffix(".pte.tmp")
        with open(tmp, "wb") as f:
            prog.write_to_file(f)
            f.flush()
            import os  # noqa: PLC0415

            os.fsync(f.fileno())
        tmp.replace(out)
        res["pte_bytes"] = Path(out).stat().st_size
        done(step)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001  (the failing step and its error are the result)
        res.update(failed_step=step, error=_one_line(e))
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


def _non_delegated_ops(edge) -> dict[str, int]:
    """Counts of the call_function nodes XNNPACK did not take (they run on ExecuTorch's portable/optimized kernels)."""
    counts: dict[str, int] = {}
    for node in edge.exported_program().graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))  # e.g. aten.topk.default
            if "executorch_call_delegate" in name or "getitem" in name:
                continue
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def time_pte(pte: str, threads: int, plan: dict) -> dict:
    import executorch.kernels.quantized  # noqa: F401, PLC0415  (registers embedding_4bit's kernels)
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from executorch.extension.pybindings import portable_lib as pl  # noqa: PLC0415

    pl._unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)  # the interpreter's own ops (id tensors) stay on the same cores
    rng = np.random.default_rng(plan["seed"])
    t0 = time.perf_counter()
    module = pl._load_for_executorch(pte)
    out: dict = dict(engine="executorch", threads=threads, load_s=time.perf_counter() - t0,
                     kernels=f"XNNPACK 8da4w g32, threadpool {pl._threadpool_get_thread_count()}",
                     prefill={}, decode={}, profile={}, routing={"prefill": {}, "decode": {}})
    lo, hi = plan["id_range"]

    def fwd(ids: list[int], start: int):
        return module.forward((torch.tensor([ids], dtype=torch.long),
                               torch.arange(start, start + len(ids), dtype=torch.long)))

    fwd([int(rng.integers(lo, hi))], 0)  # warm-up, as the mobile worker's
    # the static cache needs no reset: a prefill from position 0 masks out everything after its own tokens
    for n in sorted(plan["prompts"]):
        ids = [int(x) for x in rng.integers(lo, hi, n)]
        t = time.perf_counter()
        fwd(ids, 0)
        out["prefill"][str(n)] = time.perf_counter() - t
    for ctx in sorted(plan["decode_contexts"]):
        if ctx:
            fwd([int(x) for x in rng.integers(lo, hi, ctx)], 0)
        ids = [int(x) for x in rng.integers(lo, hi, plan["decode_tokens"])]
        t = time.perf_counter()
        for i, tok in enumerate(ids):
            fwd([tok], ctx + i)
        out["decode"][str(ctx)] = time.perf_counter() - t
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main(argv: list[str]) -> int:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="bench/executorch_worker.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--size", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-ctx", type=int, default=1024)
    e.add_argument("--max-prefill", type=int, default=512)
    e.add_argument("--form", choices=("kvcache", "native"), default="kvcache")
    e.add_argument("--out", required=True)
    t = sub.add_parser("time")
    t.add_argument("--pte", required=True)
    t.add_argument("--threads", type=int, required=True)
    t.add_argument("--plan", required=True)
    a = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 pid` prints where a long export is
    if a.cmd == "export":
        r = export(a.size, a.seed, a.max_ctx, a.form, a.out, a.max_prefill)
        print(json.dumps(r), flush=True)
        return 0 if r["ok"] else 3
    try:
        print(json.dumps(time_pte(a.pte, a.threads, json.loads(a.plan))), flush=True)
    except (RuntimeError, OSError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
