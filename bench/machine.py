"""Facts about the machine a benchmark ran on: CPU (/proc/cpuinfo SIMD flags, lscpu caches), memory, tool
versions, the engine's git commit, load average, and memory bandwidth from a STREAM triad (bench/stream.c).

Torch-free; everything here is informational except stream_bandwidth, whose figure is the roofline's denominator.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STREAM_SRC = REPO / "bench" / "stream.c"
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_int8", "sse4_2")
LSCPU_KEYS = ("Model name", "Hypervisor vendor", "L2 cache", "L3 cache", "CPU family", "Model")


def run_cmd(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> str:
    """stdout of cmd run in the repo root; a failure raises RuntimeError with the last lines of its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (rc {p.returncode}): {' | '.join(tail)}")
    return p.stdout


def stream_bandwidth(threads: list[int], work: Path, array_mib: int = 256, repeats: int = 20) -> dict[int, dict]:
    """{threads: stream.c's JSON line}; the binary is rebuilt in `work` when bench/stream.c is newer."""
    exe = work / "stream"
    if not exe.exists() or exe.stat().st_mtime < STREAM_SRC.stat().st_mtime:
        cc = os.environ.get("CC", "gcc")
        run_cmd([cc, "-O3", "-march=native", "-fopenmp", str(STREAM_SRC), "-o", str(exe)])
    return {t: json.loads(run_cmd([str(exe), str(t), str(array_mib), str(repeats)]).strip().splitlines()[-1])
            for t in threads}


def engine_commit() -> dict:
    """The commit the engine was built from: HEAD, and whether mobile/c (the C engine's source) has uncommitted
    changes, in which case the numbers belong to a work tree, not to that commit."""
    try:
        head = run_cmd(["git", "rev-parse", "HEAD"]).strip()
        dirty = bool(run_cmd(["git", "status", "--porcelain", "--", "mobile/c"]).strip())
    except (RuntimeError, OSError) as e:  # not a git checkout (a tarball): say so instead of guessing
        return dict(head="unknown", mobile_c_dirty=None, error=str(e))
    return dict(head=head, mobile_c_dirty=dirty)


def describe_commit(c: dict | None) -> str:
    if not c:
        return "not recorded"
    state = {True: "mobile/c has uncommitted changes", False: "mobile/c clean", None: "mobile/c state unknown"}
    return f"{c.get('head', 'unknown')} ({state[c.get('mobile_c_dirty')]})"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count())
    try:
        txt = Path("/proc/cpuinfo").read_text()
        for line in txt.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = [f for f in SIMD_FLAGS if f in flags]
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        info["lscpu"] = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in
                         run_cmd(["lscpu"]).splitlines() if ":" in ln) if k.strip() in LSCPU_KEYS}
    except Exception as e:  # noqa: BLE001  (informational only)
        info["error"] = str(e)
    vers = {}
    try:
        import llama_cpp  # noqa: PLC0415

        vers["llama-cpp-python"] = llama_cpp.__version__
    except Exception:  # noqa: BLE001
        vers["llama-cpp-python"] = "not installed"
    try:
        from importlib.metadata import version  # noqa: PLC0415

        vers["gguf"] = version("gguf")
    except Exception:  # noqa: BLE001
        vers["gguf"] = "?"
    try:
        vers["gcc"] = run_cmd(["gcc", "--version"]).splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    try:
        vers["git"] = run_cmd(["git", "rev-parse", "--short", "HEAD"]).strip()
    except Exception:  # noqa: BLE001
        pass
    info["versions"] = vers
    return info
