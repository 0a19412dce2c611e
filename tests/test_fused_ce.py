"""The LM-head loss paths (train/loop.py: ce_path, forward_loss): the plain F.linear + F.cross_entropy over the
full logits, and liger_kernel's fused linear + cross-entropy, which never holds the (tokens, vocab) logits.

(a) CPU picks the plain path and says so once; CUDA picks the fused path exactly when liger_kernel imports.
(b) liger's Triton kernels under TRITON_INTERPRET=1 (a child process: the interpreter must be set before triton
    is imported, and must not leak into the cubin-compile tests) give the plain path's loss and gradients -- the
    kernel alone on (hidden, weight) and the whole forward_loss on a tiny model (every parameter's gradient,
    the router aux terms), with SFT-style masks (ignore_index), an all-masked micro-batch, fp32, the CPU twin
    of the CUDA bf16 policy and QAT.
(c) model(x, return_hidden=True) is bit for bit the hidden state the logits forward feeds its LM head.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train.loop as loop
from model.config import get_config
from model.model import MobileMoE
from model.precision import BF16, FP32

ROOT = Path(__file__).resolve().parents[1]
V, T, B = 300, 16, 4  # V not a power of two and > H: liger splits the tokens into several chunks


def _model(seed=0, **ov):
    # layer 0 dense, layer 1 MoE (router z-loss and LB loss both non-zero)
    cfg = get_config("tiny", **{**dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                       n_experts=4, top_k=2, expert_ffn_dim=32, shared_ffn_dim=32, max_seq_len=T,
                                       dense_layers=(0,), lb_loss_weight=0.01, z_loss_weight=1e-3, seed=seed), **ov})
    return MobileMoE(cfg)


def _batch(seed=0, all_masked=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[0, : T // 2] = 0  # an SFT prompt: no loss on its targets
    mask[1] = 0  # a fully masked row
    if all_masked:
        mask.zero_()
    return ids, mask


# ---- (a) the path choice and its one log line ---------------------------------------------------------
def test_cpu_uses_plain_path_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(loop, "_ce_choice", {})
    m = _model()
    ids, mask = _batch()
    with caplog.at_level(logging.INFO, logger="mobilemoe.train"):
        s1, n1 = loop.forward_loss(m, ids, mask, "cpu")
        s2, _ = loop.forward_loss(m, ids, mask, "cpu")
        assert loop.ce_path("cpu") == "plain"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss:")]
    assert len(lines) == 1, lines
    assert "plain linear + cross-entropy (full logits) on cpu" in lines[0] and "CUDA only" in lines[0], lines[0]
    assert "-> plain path" in lines[0]
    # the plain path is the masked sum of per-token CE over the full logits
    logits = m(ids[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    assert torch.equal(s1, (ce * mask.reshape(-1).float()).sum()) and torch.equal(s1, s2)
    assert n1 == mask.sum()


def test_cuda_choice_follows_liger_importability(monkeypatch, caplog):
    """No GPU here: the decision for a CUDA device only depends on whether liger_kernel imports."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(loop, "_ce_choice", {})
    monkeypatch.setattr(loop, "_liger_flce", lambda: (None, "not installed (pip install -e '.[fused-ce]')"))
    with caplog.at_level(logging.INFO, logger="mobilemoe.train"):
        assert loop.ce_path(cuda) == "plain" and loop.ce_path(cuda) == "plain"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss:")]
    assert lines == ["loss: plain linear + cross-entropy (full logits) on cuda; fused linear-CE not installed "
                     "(pip install -e '.[fused-ce]') -> plain path"], lines
    pytest.importorskip("liger_kernel", reason="the fused-ce extra (make test installs it)")
    caplog.clear()
    monkeypatch.setattr(loop, "_ce_choice", {})
    monkeypatch.setattr(loop, "_liger_flce", lambda: (lambda *a, **k: None, ""))
    with caplog.at_level(logging.INFO, logger="mobilemoe.train"):
        assert loop.ce_path(cuda) == "fused" and loop.ce_path(cuda) == "fused"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss:")]
    assert len(lines) == 1 and lines[0].startswith("loss: fused linear + cross-entropy (liger_kernel "), lines


def test_liger_imports_on_this_machine():
    """The real import the CUDA path does (not only find_spec): a liger_kernel broken against this torch /
    triton would silently train on the plain path."""
    pytest.importorskip("liger_kernel", reason="the fused-ce extra (make test installs it)")
    fn, why = loop._liger_flce()
    assert fn is not None, why


# ---- (c) the hidden-state forward ---------------------------------------------------------------------
@pytest.mark.parametrize("policy,qat", [(None, False), (FP32, False), (BF16, False), (BF16, True)],
                         ids=["no-policy", "fp32", "cpu-bf16", "cpu-bf16-qat"])
def test_return_hidden_is_the_logits_forwards_hidden_state(policy, qat):
    m = _model().set_precision(policy).set_qat(qat)
    x = _batch()[0][:, :-1]
    seen = []
    hook = m.norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    logits = m(x)
    aux_logits = {k: v for k, v in m.aux.items()}
    h = m(x, return_hidden=True)
    hook.remove()
    assert h.shape == (B, T, 32)
    assert torch.equal(h, seen[0])  # the same hidden state, bit for bit
    assert torch.equal(F.linear(*m.head_operands(h)), logits)  # and the same head operands
    for k in ("lb_loss", "z_loss", "expert_counts", "router_entropy"):  # aux collected on both paths
        assert torch.equal(m.aux[k], aux_logits[k]), k
    assert float(m.aux["z_loss"].detach()) > 0


# ---- (b) liger's fused kernels under the Triton interpreter --------------------------------------------
# tolerances, relative to the largest |value| of each reference tensor:
#   fp32: 2e-5 (both paths are fp32 throughout; only chunking and summation order differ)
#   bf16: 3 bf16 eps (3 * 2^-7): the logit gradient is rounded to bf16 on both paths, but liger rounds the
#         fp32-accumulated weight gradient once more to bf16 and applies the upstream scale to the bf16
#         gradients, while the plain path scales before its rounding -> up to ~2 roundings apart, and the
#         hidden-state gradient then flows back through the same bf16 model.
TOL = {"fp32": 2e-5, "bf16": 3 * 2.0 ** -7}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _kernel_case(dt, all_masked):
    """liger_fused_linear_cross_entropy vs the plain masked CE on (hidden, weight) leaves. N=64, H=32, V=300:
    liger's chunk is next_pow2(ceil(N / ceil(V / H))) = 8 tokens, so 8 chunks accumulate the weight grad."""
    fn, why = loop._liger_flce()
    assert fn is not None, why
    g = torch.Generator().manual_seed(1)
    N, H = 64, 32
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).requires_grad_()
    tgt = torch.randint(0, V, (N,), generator=g)
    m = (torch.rand(N, generator=g) > 0.3).float() * (0.0 if all_masked else 1.0)
    scale = 0.37  # the loop back-propagates s / n_tokens * world, not s
    out = {}
    for path in ("plain", "fused"):
        h.grad = w.grad = None
        if path == "fused":
            s = fn(h.to(dt), w.to(dt), torch.where(m != 0, tgt, loop.IGNORE_INDEX), ignore_index=loop.IGNORE_INDEX,
                   reduction="sum", accum_dtype=torch.float32)
        else:
            ce = F.cross_entropy(F.linear(h.to(dt), w.to(dt)).float(), tgt, reduction="none")
            s = (ce * m).sum()
        (s * scale).backward()
        out[path] = (s.detach(), h.grad.clone(), w.grad.clone())
    (sp, ghp, gwp), (sf, ghf, gwf) = out["plain"], out["fused"]
    if all_masked:
        return dict(loss=float(sf), gh=float(ghf.abs().max()), gw=float(gwf.abs().max()), ref_loss=float(sp))
    return dict(loss=_rel(sf, sp), gh=_rel(ghf, ghp), gw=_rel(gwf, gwp))


def _model_case(policy, qat, all_masked):
    """loop.forward_loss end to end, plain vs fused (the fused path forced on CPU), same weights and batch."""
    fn, why = loop._liger_flce()
    assert fn is not None, why
    ids, mask = _batch(2, all_masked)
    res, grads = {}, {}
    for path in ("plain", "fused"):
        loop._ce_choice["cpu"] = None if path == "plain" else fn
        m = _model(seed=3).set_precision(policy).set_qat(qat)
        s, n = loop.forward_loss(m, ids, mask, "cpu")
        aux = m.aux_loss()
        ((s / n.clamp_min(1)) * 0.5 + aux).backward()  # like the loop: scaled CE plus the router terms
        res[path] = (s.detach(), n, aux.detach())
        grads[path] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    (sp, np_, ap), (sf, nf, af) = res["plain"], res["fused"]
    assert grads["plain"].keys() == grads["fused"].keys()
    rel = {k: _rel(grads["fused"][k], grads["plain"][k]) for k in grads["plain"]}
    worst = max(rel, key=rel.get)
    return dict(n_equal=bool(torch.equal(np_, nf)), aux_equal=bool(torch.equal(ap, af)), n_grads=len(rel),
                worst=worst, grad=rel[worst], head=rel["tok_emb.weight"],
                loss=float(sf) if all_masked else _rel(sf, sp))


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.manual_seed(0)
    res = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        res[f"kernel-{name}"] = _kernel_case(dt, False)
    res["kernel-fp32-all-masked"] = _kernel_case(torch.float32, True)
    res["model-fp32"] = _model_case(FP32, False, False)
    res["model-bf16"] = _model_case(BF16, False, False)
    res["model-bf16-qat"] = _model_case(BF16, True, False)
    res["model-fp32-all-masked"] = _model_case(FP32, False, True)
    print("RESULT " + json.dumps(res))


def test_liger_fused_kernel_matches_plain_path_under_interpreter():
    pytest.importorskip("liger_kernel", reason="the fused-ce extra (make test installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", "import tests.test_fused_ce as t; t._child()"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for name in ("fp32", "bf16"):
        r = res[f"kernel-{name}"]
        assert r["loss"] <= 2e-6 and r["gh"] <= TOL[name] and r["gw"] <= TOL[name], (name, r)
    r = res["kernel-fp32-all-masked"]
    assert r == dict(loss=0.0, gh=0.0, gw=0.0, ref_loss=0.0), r
    for case, tol in (("model-fp32", TOL["fp32"]), ("model-bf16", TOL["bf16"]), ("model-bf16-qat", TOL["bf16"])):
        r = res[case]
        assert r["n_equal"] and r["aux_equal"] and r["n_grads"] >= 20, (case, r)
        assert r["loss"] <= 2e-6 and r["head"] <= tol and r["grad"] <= tol, (case, r)
    r = res["model-fp32-all-masked"]  # no CE gradient at all: only the router terms' (and equal on both paths)
    assert r["loss"] == 0.0 and r["n_equal"] and r["aux_equal"] and r["grad"] <= TOL["fp32"], r
    print(json.dumps(res, indent=1))
