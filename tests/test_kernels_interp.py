"""Runs tests/kernels_interp_cases.py (Triton kernels vs PyTorch twins, values + grads) in its own pytest
process with TRITON_INTERPRET=1, so the interpreter is set before triton is imported there and never leaks
into the rest of the suite (where the cubin compile tests need the real compiler)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    env.pop("CI", None)  # the child's own skips are checked below instead
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels_interp_cases.py", "-o", "addopts=", "-q", "-rs",
                        "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) >= 44, summary  # the whole parametrised matrix ran (44 cases)
    assert "skipped" not in summary and "error" not in summary, summary
