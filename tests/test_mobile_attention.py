"""The phone engine's attention over the fp16 KV cache and its router dot product (mobile/c/attention.c).

One arithmetic order (8 lane accumulators, a fixed reduction tree, no FMA) is reproduced by the scalar
reference, AVX2+F16C and NEON, so the SIMD versions must equal the scalar one bit for bit — on x86, and
cross-compiled under qemu-aarch64 both with the default CPU and a Cortex-A53 (NEON baseline). The scalar
version is checked against a float64 NumPy softmax-attention within fp32 rounding.
Missing compilers / qemu skip here (and fail in CI, tests/conftest.py); `make test` installs them first.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests._mobile_util import BUILD, build_engine

CDIR = Path(__file__).resolve().parent.parent / "mobile" / "c"
SRCS = [str(CDIR / "tests" / "test_attention.c"), str(CDIR / "attention.c")]
FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", f"-I{CDIR}"]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found (run mobile/install_toolchain.sh as root)")


def test_simd_attention_equals_scalar_x86(tmp_path):
    _need("cc")
    exe = tmp_path / "test_attention"
    r = subprocess.run(["cc", *FLAGS, *SRCS, "-lm", "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "attention: ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("cpu", ["max", "cortex-a53"])
def test_neon_attention_equals_scalar_under_qemu(tmp_path, cpu):
    _need("aarch64-linux-gnu-gcc")
    _need("qemu-aarch64")
    exe = tmp_path / "test_attention_arm"
    r = subprocess.run(["aarch64-linux-gnu-gcc", *FLAGS, "-static", *SRCS, "-lm", "-o", str(exe)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-aarch64", "-cpu", cpu, str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "attention: ok (" in r.stdout and "impl simd" in r.stdout, r.stdout + r.stderr


@pytest.fixture(scope="module")
def lib():
    build_engine()
    return ctypes.CDLL(str(BUILD / "libmmoe.so"))


def test_attention_matches_float64_reference(lib):
    f = lib.mmoe_att_head
    fp = ctypes.POINTER(ctypes.c_float)
    hp = ctypes.POINTER(ctypes.c_uint16)
    f.argtypes = [fp, hp, hp, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_float, fp, fp, ctypes.c_int]
    best = lib.mmoe_att_best_impl()
    rng = np.random.default_rng(0)
    for hd, keys in [(64, 1), (64, 77), (32, 300), (40, 5)]:
        kvd = 3 * hd  # the row holds 3 KV heads; use the middle one
        q = rng.standard_normal(hd).astype(np.float32)
        k16 = (rng.standard_normal((keys, kvd)) * 0.7).astype(np.float16)
        v16 = rng.standard_normal((keys, kvd)).astype(np.float16)
        outs = []
        for impl in (0, best):
            sc = np.zeros(keys, np.float32)
            o = np.zeros(hd, np.float32)
            kk = k16.view(np.uint16).ravel()[hd:]
            vv = v16.view(np.uint16).ravel()[hd:]
            f(q.ctypes.data_as(fp), kk.ctypes.data_as(hp), vv.ctypes.data_as(hp), kvd, keys, hd,
              1.0 / np.sqrt(hd), sc.ctypes.data_as(fp), o.ctypes.data_as(fp), impl)
            outs.append(o)
        assert outs[0].tobytes() == outs[1].tobytes()
        K = k16[:, hd:2 * hd].astype(np.float64)
        V = v16[:, hd:2 * hd].astype(np.float64)
        s = K @ q.astype(np.float64) * np.float64(np.float32(1.0 / np.sqrt(hd)))
        p = np.exp(s - s.max())
        ref = (p / p.sum()) @ V
        # fp32 rounding of a length-hd dot, the exp and a keys-long weighted sum: a few ulps of the magnitudes
        np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=2e-5 * np.abs(V).max())


def _ids(path: Path, threads: int, env_extra: dict[str, str], n: int = 24) -> str:
    import os  # noqa: PLC0415

    env = dict(os.environ)
    env.pop("MMOE_KERNELS", None)
    env.update(env_extra)
    prompt = ",".join(str(i) for i in [5, 17, 300, 1000, 42, 7, 99, 1234, 3, 2047, 0, 512, 64, 1999, 808, 77] * 3)
    r = subprocess.run([str(BUILD / "mmoe-run"), str(path), "--prompt-ids", prompt, "-n", str(n), "-t", str(threads),
                        "--greedy", "--ids", "--ignore-eos"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_engine_threads_spin_and_attention_impl_do_not_change_tokens(tmp_path):
    """The batched thread jobs (q/k/v together, all selected experts + shared expert in one job), the spinning
    pool (MMOE_SPIN_US) and the grouped GQA attention must give the same greedy ids as 1 thread and as the
    scalar kernel set (which also takes the scalar attention)."""
    from mobile.export import export_random  # noqa: PLC0415

    build_engine()
    path = export_random("tiny", tmp_path / "t.mmoe", seed=3, init_std=0.3)
    ref = _ids(path, 1, {})
    assert len(set(ref.split(","))) > 1  # a non-trivial sequence
    assert _ids(path, 1, {"MMOE_KERNELS": "scalar"}) == ref
    assert _ids(path, 2, {}) == ref  # default: spin 50 us, then block
    assert _ids(path, 2, {"MMOE_SPIN_US": "0"}) == ref  # always block
    assert _ids(path, 3, {"MMOE_SPIN_US": "300"}) == ref
    assert _ids(path, 2, {"MMOE_SPIN_US": "50", "MMOE_KERNELS": "scalar"}) == ref
