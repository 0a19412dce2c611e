"""The end of a run: the per-stage summary table (held-out loss vs unigram entropy; float vs PTQ vs QAT), and a
sample generation from the final model, through the phone engine when mobile/ is there (export, then greedy
generate), else from the PyTorch QAT model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from train.chat import SPECIAL_TOKENS, render_prompt, special_ids

GEN_PROMPT = "Continue HAMLET's speech:\nTo be, or not to be, that is the question:"


def print_summary(results: list[dict], seconds: float) -> None:
    print("\n=== per-stage summary (held-out = whole held-out plays; nats/token) ===")
    print(f"{'stage':<9} {'steps':>6} {'tokens':>10} {'time s':>7} {'train':>7} {'held-out':>9} {'unigram':>8} "
          f"{'below uni':>9} {'sft held-out':>12}")
    for r in results:
        ev = r.get("eval", {})
        h, u = ev.get("heldout_loss"), ev.get("unigram")
        print(f"{r['stage']:<9} {r['steps']:>6} {r['tokens']:>10,} {r['seconds']:>7.0f} {r['train_loss']:>7.3f} "
              f"{h:>9.3f} {u:>8.3f} {u - h:>9.3f} " + (f"{ev['sft_loss']:>12.3f}" if "sft_loss" in ev else ""))
    q = next((r for r in results if r.get("ptq_eval")), None)
    if q is not None and q.get("float_eval"):
        a, b, c = q["float_eval"], q["ptq_eval"], q["eval"]
        print("\n=== INT4 g32 weights + int8 per-token activations: float vs PTQ vs QAT (held-out, nats/token) ===")
        print(f"{'model':<28} {'held-out':>9} {'gap':>8} {'sft held-out':>13} {'gap':>8}")
        for name, e in (("(a) float SFT", a), ("(b) PTQ INT4 of (a)", b), ("(c) QAT INT4", c)):
            print(f"{name:<28} {e['heldout_loss']:>9.4f} {e['heldout_loss'] - a['heldout_loss']:>+8.4f} "
                  f"{e.get('sft_loss', float('nan')):>13.4f} {e.get('sft_loss', 0) - a.get('sft_loss', 0):>+8.4f}")
        closer = abs(c["heldout_loss"] - a["heldout_loss"]) < abs(b["heldout_loss"] - a["heldout_loss"])
        print(f"QAT closer to float than PTQ: {'yes' if closer else 'NO'}")
    print(f"total time {seconds:.0f} s")


def generate_sample(run_dir: Path, model, tok) -> None:
    prompt = GEN_PROMPT
    mobile_main = Path(__file__).resolve().parent.parent / "mobile" / "__main__.py"
    print(f"\n=== generation (prompt: {prompt!r}) ===")
    if mobile_main.is_file():
        out = run_dir / "model.mmoe"
        py = sys.executable
        r = subprocess.run([py, "-m", "mobile", "export", "--ckpt", str(run_dir / "final"), "--out", str(out)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            g = subprocess.run([py, "-m", "mobile", "generate", "--model", str(out), "--prompt", prompt, "--chat",
                                "--greedy", "--max-new-tokens", "64"], capture_output=True, text=True)
            if g.returncode == 0:
                print("[phone engine, INT4]")
                print(g.stdout.rstrip())
                return
            print(f"warning: mobile generate failed: {(g.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
        else:
            print(f"warning: mobile export failed: {(r.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
    ids = tok.encode(render_prompt(prompt), add_special_tokens=False).ids
    sp = special_ids(tok)
    new = model.generate(ids, 64, temperature=0.0, eos_id=sp[SPECIAL_TOKENS[3]])
    print("[PyTorch QAT model (fake-quant INT4); the phone engine is not available here]")
    print(tok.decode(new, skip_special_tokens=True))
