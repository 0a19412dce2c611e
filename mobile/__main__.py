"""python -m mobile export|generate|info

  export   --ckpt <model dir | run dir> --out F.mmoe [--tokenizer tokenizer.json] [--router-dtype f32|f16] [--force]
  export   --random-init --size tiny|S|M|L|dense-1B --out F.mmoe [--seed N] [--tokenizer tokenizer.json]
           [--router-dtype f32|f16]
  generate --model F.mmoe --prompt "..." --max-new-tokens N [--greedy] [--threads T] [--chat] [--temperature X]
           [--top-p P] [--seed S] [--prompt-ids 1,2,3] [--ids] [--profile] [--float]
           [--mem-budget MB [--cache-policy lru|lfu|pin] [--prefetch]]
  info     --model F.mmoe      (header, tensor table summary)
  export --format gguf (--ckpt DIR | --random-init --size S | --from-mmoe F.mmoe) --out F.gguf --type f32|f16|q4_0
           llama.cpp GGUF (mobile/gguf_export.py)

generate prints the text, then prefill and decode tokens/s and peak RSS (lines starting "-- ").
A prompt is bytes: what the shell passes (invalid UTF-8 included) reaches the byte-level tokenizer unchanged,
as in mmoe-run. info validates the file with the C engine's loader (the rules `generate` and mmoe-run apply).
Exit status: 0 ok, 2 bad input (one line on stderr naming the file or option), 1 internal error (--debug).
"""

from __future__ import annotations

import os
import resource
import sys

from model.cli import BadInput, choices, float_range, int_range, nonneg_int, one_of, parser, positive_int, run

SEED_MAX = 2**31 - 1  # mmoe-run's --seed range: one rule for both front ends
THREADS_MAX = 256


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
        out = export_random(a.size, a.out, seed=a.seed, tokenizer_json=a.tokenizer, force=a.force,
                            router_dtype=a.router_dtype)
    else:
        if not a.ckpt:
            raise ValueError("--ckpt (a model or run directory) or --random-init is required")
        from mobile.export import export_model_dir  # noqa: PLC0415  (imports torch)

        out = export_model_dir(a.ckpt, a.out, tokenizer_json=a.tokenizer, force=a.force,
                               router_dtype=a.router_dtype)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def render_chat(prompt: str) -> str:
    """The single-turn generation prompt the SFT/QAT models are trained on (model/chat_template.py, plain
    Python: the phone side needs neither torch nor tokenizers nor train/)."""
    from model.chat_template import render_prompt  # noqa: PLC0415

    return render_prompt(prompt)


def _prompt_args(a) -> list[int] | bytes:
    """The prompt as token ids or as bytes, checked before the model is loaded. argv arrives decoded with
    surrogateescape, so os.fsencode gives back the exact bytes the shell passed (mmoe-run sees the same)."""
    if a.prompt is not None and a.prompt_ids is not None:
        raise BadInput("give --prompt or --prompt-ids, not both")
    if a.prompt_ids is not None:
        if a.chat:
            raise BadInput("--chat wraps --prompt text in the chat template: it cannot be used with --prompt-ids")
        try:
            ids = [int(t) for t in a.prompt_ids.split(",")]
        except ValueError:
            raise BadInput(f"--prompt-ids must be comma-separated integers, got {a.prompt_ids!r}") from None
        if any(t < 0 for t in ids):
            raise BadInput(f"--prompt-ids must be token ids >= 0, got {a.prompt_ids!r}")
        return ids
    if not a.prompt:  # checked on the user's text: the chat template would make an empty prompt non-empty
        raise BadInput("empty prompt: give --prompt TEXT or --prompt-ids 1,2,3")
    text = render_chat(a.prompt) if a.chat else a.prompt
    return os.fsencode(text)


def _generate(a) -> int:
    prompt = _prompt_args(a)
    from mobile.engine import DEFAULT_CACHE_POLICY, Engine, routing_stats  # noqa: PLC0415

    if a.cache_policy and a.mem_budget is None:
        raise BadInput("--cache-policy chooses how the expert cache of --mem-budget evicts: give --mem-budget too")
    if a.prefetch and a.mem_budget is None:
        raise BadInput("--prefetch fills the expert cache of --mem-budget: give --mem-budget too")
    # under a budget the KV cache is sized for this run, as mmoe-run does, not for the model's whole context
    # (a byte-level tokenizer makes at most one token a byte, so the prompt's bytes bound its tokens)
    ctx = 0 if a.mem_budget is None else len(prompt) + a.max_new_tokens
    try:
        eng = Engine(a.model, threads=a.threads, max_ctx=ctx, float_path=a.float, mem_budget_mb=a.mem_budget,
                     cache_policy=a.cache_policy or DEFAULT_CACHE_POLICY, prefetch=a.prefetch)
    except ValueError as e:
        if str(e).startswith("memory budget"):  # the C engine's refusal: name the option
            raise BadInput(f"--mem-budget {a.mem_budget:g}: {e}") from None
        raise
    with eng:
        ids = prompt if isinstance(prompt, list) else eng.tokenize(prompt)
        if not ids:
            raise BadInput("empty prompt: it tokenizes to no tokens")
        bad = [t for t in ids if t >= eng.vocab_size]
        if bad:
            raise BadInput(f"--prompt-ids: token id {bad[0]} out of range for {a.model} (vocab_size {eng.vocab_size})")
        if len(ids) + a.max_new_tokens > eng.max_ctx:
            raise BadInput(f"the prompt's {len(ids)} tokens + --max-new-tokens {a.max_new_tokens} exceed the "
                           f"context of {a.model} ({eng.max_ctx} tokens)")
        g = eng.generate(ids, a.max_new_tokens, greedy=a.greedy, temperature=a.temperature, top_p=a.top_p,
                         seed=a.seed)
        # text then the figures on stdout (callers such as `make train` show stdout); with --ids the ids line
        # stays alone on stdout so scripts can parse it, and the figures go to stderr
        stats = sys.stderr if a.ids else sys.stdout
        # the echoed prompt is shown the way generated text is: invalid UTF-8 as U+FFFD
        shown = "" if isinstance(prompt, list) else prompt.decode("utf-8", errors="replace")
        print(",".join(map(str, g.ids)) if a.ids else shown + g.text)
        rss_mb = peak_rss_mb()
        print(f"-- kernels {eng.kernels}, threads {a.threads}", file=stats)
        print(f"-- prefill: {g.prompt_tokens} tokens, {g.prefill_tok_s:.1f} tok/s", file=stats)
        print(f"-- decode: {g.decode_tokens} tokens, {g.decode_tok_s:.1f} tok/s", file=stats)
        print(f"-- peak RSS: {rss_mb:.1f} MB (this process, Python included)", file=stats)
        cs = g.cache_stats
        if cs:
            print(f"-- expert cache: policy {cs['policy']}, {cs['slots_per_layer']} slots a layer, budget "
                  f"{cs['budget_mb']:.1f} MB (min {cs['min_budget_mb']:.1f}), hits {cs['hits']} misses {cs['misses']} "
                  f"(hit rate {100 * cs['hit_rate']:.1f}%), read {cs['bytes_read'] / 2**20:.1f} MB, "
                  f"stalled {cs['stall_s']:.3f} s", file=stats)
            if cs["prefetch"]:
                print(f"-- prefetch: issued {cs['prefetch_issued']} used {cs['prefetch_used']} (accuracy "
                      f"{100 * cs['prefetch_accuracy']:.1f}%) wasted {cs['prefetch_wasted']} cancelled "
                      f"{cs['prefetch_cancelled']}", file=stats)
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
    from mobile.engine import validate_file  # noqa: PLC0415
    from mobile.format import DTYPE_NAMES, read_header, read_table  # noqa: PLC0415

    validate_file(a.model)  # the C loader's rules: nothing is printed for a file the engine would reject
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
    at = [i for i, x in enumerate(argv) if x == "--format" or x.startswith("--format=")]
    if argv[:1] != ["export"] or not at:
        return argv
    if len(at) > 1:
        raise BadInput("--format given more than once")
    i = at[0]
    if argv[i].startswith("--format="):
        fmt, rest = argv[i].split("=", 1)[1], argv[1:i] + argv[i + 1:]
    else:
        fmt, rest = (argv[i + 1] if i + 1 < len(argv) else ""), argv[1:i] + argv[i + 2:]
    if fmt == "gguf":
        from mobile.gguf_export import main_impl as gguf_main  # noqa: PLC0415  (run() here handles errors)

        return gguf_main(rest)
    if fmt != "mmoe":
        raise BadInput(f"--format must be {choices(FORMATS)}, got {fmt!r}")
    return ["export", *rest]


FORMATS = ("mmoe", "gguf")


def build_parser():
    from mobile.format import ROUTER_DTYPES  # noqa: PLC0415  (numpy only)
    from model.config import PRESETS  # noqa: PLC0415  (plain Python)

    presets = tuple(PRESETS)

    p = parser("python -m mobile", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar=choices(("export", "generate", "info")))
    e = sub.add_parser("export", help="write a .mmoe file", formatter_class=p.formatter_class,
                       description="Write a .mmoe file for the C engine (--format gguf: llama.cpp GGUF, see "
                                   "`python -m mobile.gguf_export --help`).")
    e.add_argument("--format", default="mmoe", metavar=choices(FORMATS),
                   help="output format (gguf goes to mobile/gguf_export.py with the other arguments)")
    e.add_argument("--ckpt", help="model directory (model/io.py) or a run directory holding one")
    e.add_argument("--random-init", action="store_true", help="random weights of a preset (no torch model built)")
    e.add_argument("--size", default="tiny", type=one_of(presets), metavar=choices(presets),
                   help="preset for --random-init")
    e.add_argument("--seed", type=nonneg_int, default=0, help="random seed for --random-init")
    e.add_argument("--tokenizer", help="tokenizer.json (byte-level BPE) to embed; default: the model dir's, else bytes")
    e.add_argument("--router-dtype", default="f32", type=one_of(ROUTER_DTYPES), metavar=choices(ROUTER_DTYPES),
                   help="router weights: f32 (the trained fp32 router, bit-exact with PyTorch) or f16 (half the "
                        "router bytes a decode step reads; selections may differ, see mobile/FORMAT.md)")
    e.add_argument("--out", required=True, help="output .mmoe path (written atomically)")
    e.add_argument("--force", action="store_true", help="overwrite --out even when it is not a .mmoe file")
    g = sub.add_parser("generate", help="run the C engine through ctypes", formatter_class=p.formatter_class,
                       description="Generate text with the C engine (mobile/build/libmmoe.so) through ctypes.")
    g.add_argument("--model", required=True, help=".mmoe file")
    g.add_argument("--prompt", default=None, help="prompt text (bytes as given; required unless --prompt-ids)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template (model/chat_template.py)")
    g.add_argument("--prompt-ids", help="comma-separated token ids (skips the tokenizer; not with --prompt)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate; prompt + this must fit the model's context")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float_range(0.0), default=0.8,
                   help="sampling temperature, finite and >= 0 (0 = greedy)")
    g.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus sampling mass in (0, 1] (1 = no filter)")
    g.add_argument("--seed", type=int_range(0, SEED_MAX), default=0, help=f"sampling seed in [0, {SEED_MAX}]")
    g.add_argument("--threads", type=int_range(1, THREADS_MAX), default=1, help=f"threads in [1, {THREADS_MAX}]")
    g.add_argument("--ids", action="store_true", help="print the generated token ids instead of text")
    g.add_argument("--profile", action="store_true", help="per-op timers")
    g.add_argument("--float", action="store_true", help="debug: dequantized fp32 path instead of the int kernels")
    g.add_argument("--mem-budget", type=float_range(0.0, lo_open=True), default=None, metavar="MB",
                   help="peak RSS budget in MiB for this process (Python included): the routed experts stay in the "
                        "file and are read on demand into an expert cache sized from it; below the model's "
                        "minimum is an error naming it; unset: off, everything mmapped")
    g.add_argument("--cache-policy", type=one_of(("lru", "lfu", "pin")), default=None, metavar="lru|lfu|pin",
                   help="expert-cache eviction under --mem-budget; unset: lfu, the best measured")
    g.add_argument("--prefetch", action="store_true",
                   help="under --mem-budget, each decode step guesses the next MoE layer's experts (its router on "
                        "the current hidden state) and reads the uncached ones while this layer computes; same "
                        "outputs")
    i = sub.add_parser("info", help="validate a .mmoe file, print its header and tensor table",
                       formatter_class=p.formatter_class,
                       description="Validate a .mmoe file with the C engine's loader, then print its header and "
                                   "tensor table.")
    i.add_argument("--model", required=True, help=".mmoe file")
    return p


def main_impl(argv: list[str]) -> int:
    argv = _gguf_hook(list(argv))
    if isinstance(argv, int):
        return argv
    a = build_parser().parse_args(argv)
    if a.cmd == "export":
        return _export(a)
    if a.cmd == "generate":
        return _generate(a)
    return _info(a)


def main(argv: list[str] | None = None) -> int:
    return run(main_impl, argv)


if __name__ == "__main__":
    raise SystemExit(main())
