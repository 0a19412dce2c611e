"""The phone engine's INT4 x INT8 kernels (mobile/c/kernels_*.c, contract mobile/c/kernels.h).

* x86: builds mobile/c/tests/test_kernels.c with the host compiler and runs it: every kernel set the CPU offers
  must equal the scalar set bit for bit (gemv, gemm M=1..9, odd row ranges, extreme values), and scalar must equal
  a reference that unpacks the format element by element.
* ARM: the same test cross-compiled (aarch64-linux-gnu-gcc -static) and run under qemu-aarch64 on three CPU models:
  `max` (neon + dotprod + i8mm), `cortex-a76` (dotprod, no i8mm) and `cortex-a53` (plain NEON) — the runtime
  detection must hand out exactly the sets each CPU has, so the static binary never hits SIGILL.
* Python <-> C: the C activation quantizer, fp16 conversion and scalar gemv are checked against model/quant.py,
  the format QAT trains with.
Missing compilers / qemu skip here (and fail in CI, tests/conftest.py); `make test` installs them first.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from model.quant import pack_int4, quantize_act_int8, quantize_int4

CDIR = Path(__file__).resolve().parent.parent / "mobile" / "c"
CROSS_CC = "aarch64-linux-gnu-gcc"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found (run mobile/install_toolchain.sh as root)")


def _build_kernel_test(tmp: Path, cc: str, static: bool) -> Path:
    args = ["make", "-s", "-C", str(CDIR), "-f", "kernels.mk", "kernel-test", f"KCC={cc}", f"KBUILD={tmp}"]
    if static:
        args.append("KSTATIC=1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"kernel test build failed:\n{r.stdout}\n{r.stderr}"
    return tmp / "test_kernels"


def _run(cmd: list[str], env_extra: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MMOE_KERNELS", None)
    env.update(env_extra or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _host_x86_sets() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "scalar,avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar"


@pytest.fixture(scope="module")
def x86_test(tmp_path_factory) -> Path:
    _need("cc")
    return _build_kernel_test(tmp_path_factory.mktemp("kx86"), "cc", static=False)


@pytest.fixture(scope="module")
def arm_test(tmp_path_factory) -> Path:
    _need(CROSS_CC)
    _need("qemu-aarch64")
    return _build_kernel_test(tmp_path_factory.mktemp("karm"), CROSS_CC, static=True)


def test_host_sets_equal_scalar_and_reference(x86_test):
    cmd = [str(x86_test)]
    if os.uname().machine == "x86_64":  # detection must offer exactly what /proc/cpuinfo says
        sets = _host_x86_sets()
        cmd += ["--expect-sets", sets, "--expect-best", sets.split(",")[-1]]
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK:" in r.stdout


def test_forced_kernel_set(x86_test):
    r = _run([str(x86_test), "--quick", "--expect-best", "scalar"], {"MMOE_KERNELS": "scalar"})
    assert r.returncode == 0, r.stdout + r.stderr
    # a set this CPU does not have is an error naming the problem, not a silent fallback
    r = _run([str(x86_test), "--quick", "--expect-best", "i8mm"], {"MMOE_KERNELS": "i8mm"})
    assert r.returncode != 0
    assert "MMOE_KERNELS=i8mm is not available" in r.stderr


@pytest.mark.parametrize(
    "cpu,sets",
    [
        ("max", "scalar,neon,dotprod,i8mm"),
        ("cortex-a76", "scalar,neon,dotprod"),
        ("cortex-a53", "scalar,neon"),  # no dotprod: SIGILL here would mean detection is wrong
    ],
)
def test_arm_sets_under_qemu(arm_test, cpu, sets):
    # the full matrix on max (all four sets); --quick on the others, whose sets max already covered
    cmd = ["qemu-aarch64", "-cpu", cpu, str(arm_test), "--expect-sets", sets, "--expect-best", sets.split(",")[-1]]
    if cpu != "max":
        cmd.append("--quick")
    r = _run(cmd, timeout=180)
    assert r.returncode == 0, f"rc={r.returncode} (-4 is SIGILL)\n{r.stdout}\n{r.stderr}"
    assert "OK:" in r.stdout


# ---------- Python format (model/quant.py) <-> C kernels ----------


@pytest.fixture(scope="module")
def clib(tmp_path_factory) -> ctypes.CDLL:
    _need("cc")
    so = tmp_path_factory.mktemp("kso") / "libmmoe_kernels_scalar.so"
    src = [str(CDIR / "fp16.c"), str(CDIR / "kernels_scalar.c")]
    cmd = ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-fPIC", "-shared",
           *src, "-o", str(so), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    lib.mmoe_quantize_row_q8.restype = ctypes.c_float
    lib.mmoe_quantize_row_q8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.mmoe_f32_to_fp16.restype = ctypes.c_uint16
    lib.mmoe_f32_to_fp16.argtypes = [ctypes.c_float]
    lib.mmoe_gemv_scalar.restype = None
    lib.mmoe_gemv_scalar.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_int]
    return lib


class _Q4Matrix(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("rows", ctypes.c_int), ("cols", ctypes.c_int)]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_activation_quant_matches_quant_py(clib):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(160, generator=g) * 3, torch.zeros(64), torch.randn(96, generator=g) * 1e-6,
            torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 3.0] * 4)]
    # many ties: integers and halves scaled so that amax / 127 == 1
    rows.append(torch.cat([torch.tensor([127.0]), torch.randint(-254, 255, (63,), generator=g).float() / 2]))
    for x in rows:
        q_ref, s_ref = quantize_act_int8(x)
        xf = x.float().numpy().astype(np.float32)
        q = np.zeros(xf.shape[0], dtype=np.int8)
        s = clib.mmoe_quantize_row_q8(_ptr(xf), _ptr(q), xf.shape[0])
        assert np.float32(s) == s_ref.item()
        assert np.array_equal(q, q_ref.numpy())


def test_fp16_rounding_matches_torch(clib):
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=g, dtype=torch.int64).to(torch.int32)
    f = bits.view(torch.float32)
    f = torch.cat([f, torch.randn(4000, generator=g) * 1e-5, torch.randn(2000, generator=g) * 7e4,
                   torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 65520.0, 65519.996, -0.0])])
    assert torch.isnan(f).any()  # NaN payloads and signs included
    want = f.half().view(torch.int16).numpy().astype(np.uint16)
    got = np.array([clib.mmoe_f32_to_fp16(float(v)) for v in f.numpy()], dtype=np.uint16)
    assert np.array_equal(got, want)


def test_scalar_gemv_reads_the_quant_py_format(clib):
    """pack_int4(quantize_int4(w)) fed to the C scalar gemv gives exactly the contract's arithmetic done in numpy."""
    g = torch.Generator().manual_seed(2)
    rows, K = 37, 192
    w = torch.randn(rows, K, generator=g)
    w[3] = 0.0  # all-zero groups get the smallest normal scale 2^-14
    x = torch.randn(K, generator=g) * 2
    q_w, s16 = quantize_int4(w)
    qs = pack_int4(q_w).numpy().astype(np.uint8).copy()
    d = s16.view(torch.int16).numpy().astype(np.uint16).copy()
    q_x, a = quantize_act_int8(x)
    xq = q_x.numpy().copy()
    y = np.zeros(rows, dtype=np.float32)
    W = _Q4Matrix(_ptr(qs), _ptr(d), rows, K)
    clib.mmoe_gemv_scalar(ctypes.byref(W), _ptr(xq), ctypes.c_float(a.item()), _ptr(y), 0, rows)

    isum = (q_w.numpy().astype(np.int64).reshape(rows, K // 32, 32) * xq.astype(np.int64).reshape(1, K // 32, 32)).sum(-1)
    scales = s16.float().numpy()
    acc = np.zeros(rows, dtype=np.float32)
    for gi in range(K // 32):  # the contract's order: one fp32 rounding per multiply and per add
        acc = (acc + isum[:, gi].astype(np.float32) * scales[:, gi]).astype(np.float32)
    want = (acc * np.float32(a.item())).astype(np.float32)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    # and it is the fake-quant matmul up to fp32 summation order
    fq = (q_x.float() * a) @ (q_w.float().reshape(rows, K // 32, 32) * s16.float().unsqueeze(-1)).reshape(rows, K).T
    np.testing.assert_allclose(y, fq.numpy(), rtol=1e-5, atol=1e-5)
