"""Router rows with NaN / +inf / -inf logits: ids always k distinct ids in [0, E), the same rule in the PyTorch
reference, the Triton kernel and the C engine (see kernels/router.py's docstring).

The Triton half runs tests/router_nan_cases.py in its own pytest process with TRITON_INTERPRET=1 (set before
triton is imported there, so the interpreter never leaks into the cubin compile tests), like
tests/test_kernels_interp.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from kernels.router import route_reference
from tests._mobile_util import build_engine

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def test_triton_router_nan_rows_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    env.pop("CI", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/router_nan_cases.py", "-o", "addopts=", "-q", "-rs",
                        "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) >= 50, summary  # the whole parametrised matrix ran (36 + 8 + 6 cases)
    assert "skipped" not in summary and "error" not in summary and "failed" not in summary, summary


def test_reference_rule_on_small_rows():
    logits = torch.tensor([[0.0, 3.0, NAN, 1.0, 2.0, -1.0],      # sigmoid: NaN ranks last
                           [NAN] * 6,                             # all NaN: lowest ids, NaN gates
                           [-INF, 0.5, -INF, 0.5, INF, -INF],     # ties -> lower id
                           [-INF] * 6])                           # sigmoid scores all 0: lowest ids, gates 0
    ids, gates, scores = route_reference(logits, 3, "sigmoid", True)
    assert ids.tolist() == [[1, 4, 3], [0, 1, 2], [4, 1, 3], [0, 1, 2]]
    assert torch.isfinite(gates[0]).all() and torch.isnan(gates[1]).all()
    torch.testing.assert_close(gates[2], torch.tensor([1.0, 0.62246, 0.62246]) / (1 + 2 * 0.62246), atol=1e-4, rtol=0)
    assert gates[3].tolist() == [0.0, 0.0, 0.0]
    # softmax: a row with a NaN or +inf logit is NaN everywhere -> ids 0..k-1 and NaN gates, so the loss goes
    # NaN and train/loop.py stops at that step; a -inf logit alone is just a zero probability
    ids, gates, _ = route_reference(logits, 2, "softmax", False, torch.tensor([0.0, 0, 0, 0, 0, 9]))
    assert ids.tolist() == [[0, 1], [0, 1], [0, 1], [0, 1]] and torch.isnan(gates).all()
    ids, gates, _ = route_reference(torch.tensor([[-INF, 1.0, 2.0, -INF]]), 2, "softmax", True)
    assert ids.tolist() == [[2, 1]] and torch.isfinite(gates).all()


def test_c_engine_ranks_nan_router_scores_last():
    """Sigmoid router whose expert-0 row is NaN in every MoE layer: the reference never picks expert 0 (NaN ranks
    like -inf), so its logits are finite; the C engine must pick the same experts (before the fix it took the
    NaN expert first whenever it was the first unused one, and its NaN gate made every logit NaN). The exporter
    refuses non-finite weights, so the NaN rows are written into the exported file's fp32 router tensors."""
    from mobile import Engine  # noqa: PLC0415
    from mobile.export import export_model_dir  # noqa: PLC0415
    from mobile.format import DT_F32, read_table  # noqa: PLC0415
    from model.config import get_config  # noqa: PLC0415
    from model.io import save_model_dir  # noqa: PLC0415
    from model.model import MobileMoE  # noqa: PLC0415

    build_engine()
    torch.manual_seed(0)
    model = MobileMoE(get_config("tiny", init_std=0.1, seed=1, router_score="sigmoid")).set_qat(True).eval()
    prompt = [5, 17, 300, 1000, 42, 7, 99, 1234]
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(model, Path(d) / "model")
        export_model_dir(Path(d) / "model", Path(d) / "t.mmoe")
        buf = bytearray((Path(d) / "t.mmoe").read_bytes())
        entries = [e for e in read_table(bytes(buf)) if e.name.endswith(".router")]
        assert entries and all(e.dtype == DT_F32 for e in entries)
        for e in entries:  # row 0 of the (E, D) fp32 matrix
            buf[e.offset:e.offset + 4 * e.shape[1]] = np.full(e.shape[1], np.nan, dtype="<f4").tobytes()
        (Path(d) / "t.mmoe").write_bytes(bytes(buf))
        routers = [m.router for m in model.modules() if hasattr(m, "router")]
        assert len(routers) == len(entries)
        with torch.no_grad():
            for r in routers:
                r.weight[0] = NAN
            ref = model(torch.tensor([prompt]))[0].numpy()
        assert np.isfinite(ref).all()
        with Engine(Path(d) / "t.mmoe") as eng:
            got = eng.eval(prompt, all_logits=True)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.1 * float(ref.std())  # the parity bound of tests/test_mobile_parity.py
