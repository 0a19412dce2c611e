"""CPU training under shared cores: OpenMP wait policy x thread count, as found and beside a competing load.

    python -m bench.threads [--seconds 15] [--repeats 3] [--out bench/results/threads.md]

Each cell runs the tiny preset's training step (forward + backward + AdamW, batch 16 x 128 tokens) for about
--seconds (at least 2 steps, after one warm-up step) in a fresh process, since OMP_WAIT_POLICY is read once, when
libgomp starts, and reports steps/s. Cells are interleaved repeat by repeat so drift hits them alike. "as found" is
the machine as it is (the report records its load average); "busy" adds one spinning process per CPU, as `make
train` sees when another job shares the machine. Why it matters: libgomp's default spins ~300k iterations at every
barrier before sleeping, which is free on idle cores and a collapse when the core's other tenant holds it (measured
7 -> 23 min for `make train` beside a 2-core compile); `python -m train` therefore defaults to PASSIVE.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from model import cli

_STEP_SCRIPT = r"""
import sys, time, torch
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
from model.config import get_config
from model.model import MobileMoE
m = MobileMoE(get_config("tiny", max_seq_len=128))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, m.cfg.vocab_size, (16, 129))
def step():
    logits = m(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + m.aux_loss()
    opt.zero_grad(); loss.backward(); opt.step()
step()
t, n = time.perf_counter(), 0
while n < 2 or time.perf_counter() - t < seconds:  # time-boxed: a collapsed cell must not take minutes
    step()
    n += 1
print(n / (time.perf_counter() - t))
"""

CELLS = [("default", 2), ("PASSIVE", 2), ("default", 1)]


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_cell(policy: str, threads: int, seconds: float) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, str(threads), str(seconds)], env=env, cwd=root,
                       capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m bench.threads", __doc__)
    p.add_argument("--seconds", type=cli.positive_float, default=15.0, help="timed seconds per cell")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="interleaved repeats")
    p.add_argument("--out", default="bench/results/threads.md", help="report (markdown)")
    a = p.parse_args(argv)
    ncpu = os.cpu_count() or 1
    res: dict[str, list[float]] = {}
    load0 = os.getloadavg()[0]
    for rep in range(a.repeats):
        for load in ("as found", "busy"):
            for policy, threads in CELLS:
                spinners = []
                if load == "busy":
                    stop = time.time() + 600
                    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(ncpu)]
                    for s in spinners:
                        s.start()
                try:
                    v = run_cell(policy, threads, a.seconds)
                finally:
                    for s in spinners:
                        s.terminate()
                        s.join()
                res.setdefault(f"{load}|{policy}|{threads}", []).append(v)
                print(f"repeat {rep + 1}/{a.repeats} {load:8s} OMP_WAIT_POLICY={policy:7s} threads={threads}: "
                      f"{v:.2f} steps/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items()}
    import torch  # noqa: PLC0415  (only for its version line; the cells ran in their own processes)

    from bench.machine import describe_commit, engine_commit, machine_info  # noqa: PLC0415

    info = machine_info()
    lines = ["# CPU training under shared cores", "",
             f"Machine: {info.get('cpu', '?')} ({' '.join(info.get('flags', [])) or 'no SIMD flags read'}); torch {torch.__version__} (OpenMP); commit "
             f"{describe_commit(engine_commit())}.", "",
             f"`python -m bench.threads --seconds {a.seconds:g} --repeats {a.repeats}`; tiny preset, batch 16 x 128, "
             f"{ncpu} CPUs, load average {load0:.1f} at the start; median steps/s of {a.repeats} interleaved repeats "
             "(busy = one spinning process per CPU added).", "",
             "| OMP_WAIT_POLICY | threads | as found steps/s | busy steps/s | busy / as found |", "|---|---|---|---|---|"]
    for policy, threads in CELLS:
        q, b = med[f"as found|{policy}|{threads}"], med[f"busy|{policy}|{threads}"]
        lines.append(f"| {policy} | {threads} | {q:.2f} | {b:.2f} | {b / q:.2f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n\n```json\n" + json.dumps(res, indent=1) + "\n```\n")
    os.replace(tmp, out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
