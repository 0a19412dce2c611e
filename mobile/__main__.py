"""python -m mobile export|generate|info

  export   --ckpt <model dir | run dir> --out F.mmoe [--tokenizer tokenizer.json] [--force]
  export   --random-init --size tiny|S|M|L|dense-1B --out F.mmoe [--seed N] [--tokenizer tokenizer.json]
  generate --model F.mmoe --prompt "..." --max-new-tokens N [--greedy] [--threads T] [--chat] [--temperature X]
           [--top-p P] [--seed S] [--prompt-ids 1,2,3] [--ids] [--profile] [--float]
  info     --model F.mmoe      (header, tensor table summary)
  export --format gguf (--ckpt DIR | --random-init --size S | --from-mmoe F.mmoe) --out F.gguf --type f32|f16|q4_0
           llama.cpp GGUF (mobile/gguf_export.py)

generate prints the text, then prefill and decode tokens/s and peak RSS (lines starting "-- "). Errors: one line, exit status 1/2.
"""

from __future__ import annotations

import argparse
import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, so it starts afresh at exec; ru_maxrss
    survives exec on Linux and would report the parent's peak when a large process (make train) forks us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _export(a) -> int:
    from mobile.format import check_mmoe_target  # noqa: PLC0415

    check_mmoe_target(a.out, a.force)  # refuse before loading or generating anything
    if a.random_init:
        from mobile.export import export_random  # noqa: PLC0415

        if a.ckpt:
            raise ValueError("give either --ckpt or --random-init, not both")
        out = export_random(a.size, a.out, seed=a.seed, tokenizer_json=a.tokenizer, force=a.force)
    else:
        if not a.ckpt:
            raise ValueError("--ckpt (a model or run directory) or --random-init is required")
        from mobile.export import export_model_dir  # noqa: PLC0415  (imports torch)

        out = export_model_dir(a.ckpt, a.out, tokenizer_json=a.tokenizer, force=a.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def render_chat(prompt: str) -> str:
    """The single-turn generation prompt the SFT/QAT models are trained on (model/chat_template.py, plain
    Python: the phone side needs neither torch nor tokenizers nor train/)."""
    from model.chat_template import render_prompt  # noqa: PLC0415

    return render_prompt(prompt)


def _generate(a) -> int:
    from mobile.engine import Engine, routing_stats  # noqa: PLC0415

    with Engine(a.model, threads=a.threads, float_path=a.float) as eng:
        if a.prompt_ids:
            try:
                prompt = [int(t) for t in a.prompt_ids.split(",")]
            except ValueError:
                raise ValueError(f"--prompt-ids must be comma-separated integers, got {a.prompt_ids!r}") from None
        else:
            prompt = render_chat(a.prompt) if a.chat else a.prompt
        g = eng.generate(prompt, a.max_new_tokens, greedy=a.greedy, temperature=a.temperature, top_p=a.top_p,
                         seed=a.seed)
        # text then the figures on stdout (callers such as `make train` show stdout); with --ids the ids line
        # stays alone on stdout so scripts can parse it, and the figures go to stderr
        stats = sys.stderr if a.ids else sys.stdout
        print(",".join(map(str, g.ids)) if a.ids else (prompt if isinstance(prompt, str) else "") + g.text)
        rss_mb = peak_rss_mb()
        print(f"-- kernels {eng.kernels}, threads {a.threads}", file=stats)
        print(f"-- prefill: {g.prompt_tokens} tokens, {g.prefill_tok_s:.1f} tok/s", file=stats)
        print(f"-- decode: {g.decode_tokens} tokens, {g.decode_tok_s:.1f} tok/s", file=stats)
        print(f"-- peak RSS: {rss_mb:.1f} MB (this process, Python included)", file=stats)
        if a.profile:
            tot = sum(g.profile.values()) or 1.0
            for k, v in g.profile.items():
                print(f"--   {k:<10} {1e3 * v:9.3f} ms  {100 * v / tot:5.1f}%", file=stats)
            r = routing_stats(g.expert_counts)
            if r:
                print(f"-- routing ({r['layers']} MoE layers, prefill + decode): distinct experts per layer "
                      f"min {r['distinct_min']} / median {r['distinct_median']:g} of {r['n_experts']}; "
                      f"max/mean load median {r['load_median']:.2f}, worst {r['load_worst']:.2f}", file=stats)
    return 0


def _info(a) -> int:
    from mobile.format import DTYPE_NAMES, read_header, read_table  # noqa: PLC0415

    with open(a.model, "rb") as f:
        buf = f.read()
    h = read_header(buf)
    for k, v in h.items():
        if k != "layer_kinds":
            print(f"{k:20s} {v}")
    print(f"{'layer_kinds':20s} {''.join('M' if k else 'D' for k in h['layer_kinds'])}")
    for t in read_table(buf):
        print(f"  {t.name:32s} {DTYPE_NAMES.get(t.dtype, t.dtype):14s} {str(t.shape):22s} @{t.offset} {t.size} B")
    return 0


def _gguf_hook(argv: list[str]) -> list[str] | int:
    """`export --format gguf ...` goes to mobile/gguf_export.py (llama.cpp GGUF, the bench engineer's module);
    `--format mmoe` (the default) continues here. Returns the argv to parse, or an exit status."""
    if argv[:1] != ["export"] or "--format" not in argv:
        return argv
    i = argv.index("--format")
    fmt = argv[i + 1] if i + 1 < len(argv) else ""
    rest = argv[1:i] + argv[i + 2:]
    if fmt == "gguf":
        from mobile.gguf_export import main as gguf_main  # noqa: PLC0415

        return gguf_main(rest)
    if fmt != "mmoe":
        print(f"error: --format must be mmoe or gguf, got {fmt!r}", file=sys.stderr)
        return 2
    return ["export", *rest]


def main(argv: list[str] | None = None) -> int:
    argv = _gguf_hook(list(sys.argv[1:] if argv is None else argv))
    if isinstance(argv, int):
        return argv
    p = argparse.ArgumentParser(prog="python -m mobile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a .mmoe file")
    e.add_argument("--ckpt", help="model directory (model/io.py) or a run directory holding one")
    e.add_argument("--random-init", action="store_true", help="random weights of a preset (no torch model built)")
    e.add_argument("--size", default="tiny", help="preset for --random-init")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--tokenizer", help="tokenizer.json (byte-level BPE) to embed; default: the model dir's, else bytes")
    e.add_argument("--out", required=True)
    e.add_argument("--force", action="store_true", help="overwrite --out even when it is not a .mmoe file")
    g = sub.add_parser("generate", help="run the C engine through ctypes")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template (model/chat_template.py)")
    g.add_argument("--prompt-ids", help="comma-separated token ids (skips the tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--ids", action="store_true", help="print the generated token ids instead of text")
    g.add_argument("--profile", action="store_true", help="per-op timers")
    g.add_argument("--float", action="store_true", help="debug: dequantized fp32 path instead of the int kernels")
    i = sub.add_parser("info", help="print a .mmoe header and tensor table")
    i.add_argument("--model", required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "export":
            return _export(a)
        if a.cmd == "generate":
            if a.max_new_tokens < 1:
                raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
            return _generate(a)
        return _info(a)
    except (ValueError, FileNotFoundError, OSError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
