"""Greedy generation of the tiny model by the static aarch64 engine under qemu-aarch64 equals the x86 engine's.

One static ARM build of mmoe-run (aarch64-linux-gnu-gcc, mobile/c/Makefile CROSS=...) runs on three emulated CPUs:
`max` (i8mm prefill + dotprod decode), `cortex-a76` (dotprod, no i8mm) and `cortex-a53` (plain NEON: the runtime
detection must fall back without SIGILL); plus MMOE_KERNELS=dotprod on `max` and a multi-threaded run. Every run
must print the same 64 token ids as the x86 build (AVX2 and scalar). The kernels are bit-exact by contract
(mobile/c/kernels.h) and the engine builds with -ffp-contract=off, so equality is exact, not approximate.

The model is the tiny preset, randomly initialised with init_std=0.3 (not the default 0.02): at the default scale
the residual stream is the token embedding and greedy decoding just repeats one token, which would make the
comparison blind; at 0.3 the 64 ids vary (checked below), so a single differing logit argmax shows up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CDIR = ROOT / "mobile" / "c"
PROMPT = "11,200,37,1500,9,640,3,77,1024,5,300,2047,42"  # 13 tokens: prefill tiles of 4 plus a leftover token
N_NEW = 64


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found (run mobile/install_toolchain.sh as root)")


def _make(build: Path, *extra: str) -> Path:
    r = subprocess.run(["make", "-s", "-C", str(CDIR), f"BUILD={build}", *extra], capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, f"engine build failed:\n{r.stdout}\n{r.stderr}"
    exe = build / "mmoe-run"
    assert exe.is_file()
    return exe


def _generate(cmd_prefix: list[str], exe: Path, model: Path, threads: int = 1,
              kernels: str | None = None) -> tuple[list[int], str]:
    env = dict(os.environ)
    env.pop("MMOE_KERNELS", None)
    if kernels:
        env["MMOE_KERNELS"] = kernels
    cmd = [*cmd_prefix, str(exe), str(model), "--prompt-ids", PROMPT, "-n", str(N_NEW), "--greedy", "--ids",
           "--ignore-eos", "-t", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}: rc={r.returncode} (-4 is SIGILL)\n{r.stdout}\n{r.stderr}"
    m = re.search(r"kernels: (\w+)", r.stderr)
    assert m, f"no 'kernels: NAME' line on stderr:\n{r.stderr}"
    ids = [int(t) for t in r.stdout.strip().split(",")]
    return ids, m.group(1)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    _need("cc")
    _need("aarch64-linux-gnu-gcc")
    _need("qemu-aarch64")
    tmp = tmp_path_factory.mktemp("arm_gen")
    from mobile.export import export_random

    model = export_random("tiny", tmp / "tiny.mmoe", seed=3, init_std=0.3)
    x86 = _make(tmp / "x86")
    arm = _make(tmp / "aarch64", "CROSS=aarch64-linux-gnu-")
    ids, ks = _generate([], x86, model)
    return model, x86, arm, ids, ks


def test_x86_reference_is_informative(engines):
    model, x86, _, ids, ks = engines
    assert len(ids) == N_NEW
    assert len(set(ids)) >= 8, f"greedy output too repetitive to compare builds: {ids}"
    ids_scalar, ks_scalar = _generate([], x86, model, threads=2, kernels="scalar")
    assert ks_scalar == "scalar"
    assert ids_scalar == ids, f"x86 {ks} vs scalar (2 threads) differ"


@pytest.mark.parametrize(
    "cpu,kernels,threads,want_set",
    [
        ("max", None, 1, "i8mm"),
        ("max", "dotprod", 3, "dotprod"),
        ("cortex-a76", None, 1, "dotprod"),
        ("cortex-a53", None, 2, "neon"),  # fallback: no dotprod / i8mm instructions may run here
    ],
)
def test_arm_greedy_equals_x86(engines, cpu, kernels, threads, want_set):
    model, _, arm, ids_x86, ks_x86 = engines
    ids, ks = _generate(["qemu-aarch64", "-cpu", cpu], arm, model, threads=threads, kernels=kernels)
    assert ks == want_set, f"qemu -cpu {cpu}: engine picked {ks}, expected {want_set}"
    assert ids == ids_x86, f"aarch64 ({cpu}, {ks}) ids differ from x86 ({ks_x86}):\n{ids}\n{ids_x86}"


def test_arm_forced_missing_set_is_a_clear_error(engines):
    """MMOE_KERNELS=dotprod on a CPU without dotprod: a one-line error and a non-zero exit, never SIGILL."""
    model, _, arm, _, _ = engines
    env = dict(os.environ, MMOE_KERNELS="dotprod")
    r = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a53", str(arm), str(model), "--prompt-ids", "1,2", "-n", "2",
                        "--greedy", "--ids"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode > 0, f"rc={r.returncode} (negative = killed by a signal)\n{r.stderr}"
    assert "MMOE_KERNELS=dotprod is not available" in r.stderr


@pytest.mark.parametrize("cpu", ["max", "cortex-a53"])
def test_arm_f16_router_greedy_equals_x86(engines, tmp_path, cpu):
    """An fp16-router file (export --router-dtype f16): the NEON router dot (mmoe_dot_f16), x86 AVX2+F16C and the
    scalar one give the same greedy tokens."""
    from mobile.export import export_random

    _, x86, arm, _, _ = engines
    model = export_random("tiny", tmp_path / "tiny-f16.mmoe", seed=3, init_std=0.3, router_dtype="f16")
    ids_x86, _ = _generate([], x86, model)
    ids_scalar, ks = _generate([], x86, model, threads=2, kernels="scalar")
    assert ks == "scalar" and ids_scalar == ids_x86
    assert len(set(ids_x86)) >= 8, ids_x86
    ids, _ = _generate(["qemu-aarch64", "-cpu", cpu], arm, model)
    assert ids == ids_x86, f"aarch64 ({cpu}) f16-router ids differ from x86:\n{ids}\n{ids_x86}"
