"""mobile/install_toolchain.sh: installs what the native tests need and fails naming the package when it cannot.

The first test checks this machine really has every tool (CI runs `make toolchain` first, so a missing sanitizer
runtime fails here by name, not later as a link error). The others run the script against stub commands on PATH
(clang without its runtimes, an apt-get that fails, a non-root user) so the failure paths are exercised on a
machine that has everything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "mobile" / "install_toolchain.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_toolchain_present():
    r = _run("--check")
    if r.returncode != 0 and os.geteuid() != 0 and os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip(f"toolchain incomplete and not root: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr


def _stubs(tmp: Path, *, uid: int = 0, apt_ok: bool = False, sanitizers: bool = False) -> dict:
    """A PATH whose first entries fake clang (14.0.6, runtimes absent unless `sanitizers`), the cross tools,
    `id` and apt-get."""
    d = tmp / "bin"
    d.mkdir()
    stubs = {
        "clang": f"""case "$*" in *-dumpversion*) echo 14.0.6; exit 0;; esac
case "$*" in *-fsanitize*) {'exit 0' if sanitizers else
    'echo "ld: cannot find /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.asan-x86_64.a" >&2; exit 1'};; esac
exit 0""",
        "aarch64-linux-gnu-gcc": "exit 0",
        "qemu-aarch64": "exit 0",
        "id": f'[ "$1" = -u ] && echo {uid} || /usr/bin/id "$@"',
        "apt-get": ('echo "apt-get $*" >> "$APT_LOG"; exit 0' if apt_ok else
                    'echo "apt-get $*" >> "$APT_LOG"; case "$*" in *install*) '
                    'echo "E: Unable to locate package $5" >&2; exit 100;; esac; exit 0'),
    }
    for name, body in stubs.items():
        p = d / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{d}:{env['PATH']}"
    env["APT_LOG"] = str(tmp / "apt.log")
    return env


def test_check_names_missing_sanitizer_runtime(tmp_path):
    r = _run("--check", env=_stubs(tmp_path))
    assert r.returncode == 1
    assert "sanitizers" in r.stderr and "libclang-rt-14-dev" in r.stderr
    assert not (tmp_path / "apt.log").exists(), "--check must not install anything"


def test_failed_install_is_an_error_naming_the_package(tmp_path):
    r = _run(env=_stubs(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "apt-get install libclang-rt-14-dev failed" in r.stderr
    log = (tmp_path / "apt.log").read_text()
    assert "--no-install-recommends libclang-rt-14-dev" in log  # asked for the runtime of the clang on PATH


def test_install_that_does_not_fix_the_probe_is_an_error(tmp_path):
    r = _run(env=_stubs(tmp_path, apt_ok=True))  # apt "succeeds" but the link still fails
    assert r.returncode == 1
    assert "still fail" in r.stderr and "libclang-rt-14-dev" in r.stderr


def test_complete_stub_toolchain_passes(tmp_path):
    r = _run(env=_stubs(tmp_path, sanitizers=True))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "apt.log").exists()


def test_not_root_fails_in_ci_and_warns_elsewhere(tmp_path):
    env = _stubs(tmp_path, uid=1000)
    r = _run(env=env)
    assert r.returncode == 0 and "warning: sanitizers is missing" in r.stderr
    r = _run(env=dict(env, CI="true"))
    assert r.returncode == 1 and "error: sanitizers is missing" in r.stderr and "libclang-rt-14-dev" in r.stderr
