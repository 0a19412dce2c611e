"""torch.compile of the model: the routed experts are one custom op (kernels/moe.py: mobilemoe::moe_experts),
so the whole tiny model compiles with fullgraph=True on the reference backend and its loss and gradients match
eager; opcheck validates the op's schema, fake (meta) implementation and autograd registration.

The model is compiled with backend="aot_eager": dynamo (fullgraph: any graph break raises) and AOTAutograd
(fake tensors through the op's fake implementations, functionalization, the joint forward/backward graph with
the backward op, the partitioner) run exactly as under the default backend; only inductor's code generation is
skipped, because a cold inductor compile of even a one-layer model takes ~1 min of CPU here. Inductor itself is
checked on the op alone (test_inductor_runs_the_op_as_an_extern_kernel) and on the whole train step by
bench/compile.py, which also compares the compiled loss with eager."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.moe as kmoe
from kernels.moe import act_fq_name, moe_experts, moe_experts_backward_op, moe_experts_op
from model.config import get_config
from model.model import MobileMoE
from model.quant import fake_quant_act_int8

V, T, B = 256, 16, 2


def _model():
    # layer 0 dense, layer 1 MoE with a shared expert; the router bias on, so its selection path is traced too
    cfg = get_config("tiny", vocab_size=V, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=8, top_k=2,
                     expert_ffn_dim=32, shared_ffn_dim=32, ffn_dim=64, max_seq_len=T, dense_layers=(0,),
                     router_bias_coeff=1e-3)
    m = MobileMoE(cfg)
    for layer in m.layers:
        if layer.is_moe:  # a non-zero selection bias, so it changes which experts are picked
            layer.moe.expert_bias.copy_(torch.linspace(-0.05, 0.05, cfg.n_experts))
    return m


def _loss(model, ids_BT):
    logits = model(ids_BT[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), ids_BT[:, 1:].reshape(-1))
    return ce + model.aux_loss()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def eager_and_compiled():
    """One compile for the module."""
    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, T + 1))
    model = _model()
    loss_e = _loss(model, ids)  # eager first: also does the one-time logging, which dynamo cannot trace
    loss_e.backward()
    grads_e = _grads(model)
    accum_e = [layer.moe.load_accum.clone() for layer in model.layers if layer.is_moe]
    model.zero_grad(set_to_none=True)
    for layer in model.layers:
        if layer.is_moe:
            layer.moe.load_accum.zero_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # any graph break raises
    loss_c = _loss(compiled, ids)
    loss_c.backward()
    accum_c = [layer.moe.load_accum.clone() for layer in model.layers if layer.is_moe]
    return dict(model=model, compiled=compiled, ids=ids, loss_e=loss_e.detach(), loss_c=loss_c.detach(),
                grads_e=grads_e, grads_c=_grads(model), accum_e=accum_e, accum_c=accum_c)


def test_compiled_fullgraph_matches_eager_loss_and_grads(eager_and_compiled):
    r = eager_and_compiled
    # fp32 throughout; AOTAutograd's decompositions (silu, softmax, CE backward) and the recomputed expert
    # forward reorder fp32 rounding, so values agree to rounding, not bitwise: 1e-5 relative on the loss,
    # 1e-4 relative (+1e-6 absolute) per gradient element
    torch.testing.assert_close(r["loss_c"], r["loss_e"], rtol=1e-5, atol=0)
    assert r["grads_c"].keys() == r["grads_e"].keys()
    for name, g in r["grads_e"].items():
        assert g.abs().max() > 0, f"{name}: zero gradient in eager, so the comparison would prove nothing"
        torch.testing.assert_close(r["grads_c"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the routing decision (and the buffer mutation recording it) is the same under compile
    for a_c, a_e in zip(r["accum_c"], r["accum_e"]):
        assert torch.equal(a_c, a_e)


def test_compiled_model_runs_the_custom_op(eager_and_compiled, monkeypatch):
    """The compiled graph calls mobilemoe::moe_experts (and its backward op), not the eager dispatch."""
    r = eager_and_compiled
    calls = []
    real = kmoe.dispatch_experts
    monkeypatch.setattr(kmoe, "dispatch_experts", lambda *a: (calls.append(torch.is_grad_enabled()), real(*a))[1])
    _loss(r["compiled"], r["ids"]).backward()  # same shapes: no recompile, so the patch is not traced
    n_moe = sum(layer.is_moe for layer in r["model"].layers)
    # forward op without grad, then the backward op's recompute with grad, once per MoE layer
    assert calls.count(False) == n_moe and calls.count(True) == n_moe


@pytest.mark.parametrize("qat", [False, True])
def test_moe_block_has_no_graph_break_from_cold(monkeypatch, qat):
    """explain on one MoE block with the backend-choice log not yet done (as in a first compiled step); under QAT
    the activation fake-quant crosses the op by name."""
    monkeypatch.setattr(kmoe, "_logged", set())
    moe = _model().layers[1].moe
    moe.qat = qat
    x = torch.randn(B, T, 64)
    ex = torch._dynamo.explain(moe)(x)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_inductor_runs_the_op_as_an_extern_kernel():
    """Under the default backend the op and its backward op run as inductor extern kernels, i.e. the same code
    as eager: bitwise equal values and gradients."""
    outs = []
    for compiled in (False, True):
        x, ids, gates, w13, w2 = _op_inputs(torch.float32)
        leaves = [t.requires_grad_() for t in (x, gates, w13, w2)]
        f = lambda x, ids, g, a, b: moe_experts(x, ids, g, a, b, "reference")  # noqa: E731
        y = (torch.compile(f, fullgraph=True) if compiled else f)(leaves[0], ids, *leaves[1:])
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _op_inputs(dtype, E=4, Tn=12, K=2, D=16, Fe=8, empty=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Tn, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E - int(empty), generator=g)[:K] for _ in range(Tn)])  # expert E-1 empty
    gates = torch.softmax(torch.randn(Tn, K, generator=g), -1)  # fp32 gates, as the router gives them
    w13 = (torch.randn(E, 2 * Fe, D, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, D, Fe, generator=g) * 0.2).to(dtype)
    return x, ids, gates, w13, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_moe_experts(dtype):
    x, ids, gates, w13, w2 = _op_inputs(dtype)
    leaves = [t.requires_grad_() for t in (x, gates, w13, w2)]
    torch.library.opcheck(moe_experts_op, (leaves[0], ids, leaves[1], leaves[2], leaves[3], "reference", ""))
    dy = torch.randn(x.shape[0], w2.shape[1]).to(dtype)
    torch.library.opcheck(moe_experts_backward_op, (dy, *(t.detach() for t in (x, ids, gates, w13, w2)),
                                                    "reference", ""))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qat", [False, True])
def test_op_equals_direct_dispatch(dtype, qat):
    """The op's forward and its recompute backward are the eager path's own computation: bitwise equal, incl. an
    empty expert's exact zero weight gradient, bf16 operands with fp32 gates, and the QAT fake-quant by name."""
    act_fq = fake_quant_act_int8 if qat else None
    name = act_fq_name(act_fq)
    assert name == ("model.quant:fake_quant_act_int8" if qat else "")
    outs = []
    for use_op in (False, True):
        x, ids, gates, w13, w2 = _op_inputs(dtype)
        leaves = [t.requires_grad_() for t in (x, gates, w13, w2)]
        args = (leaves[0], ids, leaves[1], leaves[2], leaves[3])
        y = moe_experts_op(*args, "reference", name) if use_op else moe_experts(*args, "reference", act_fq)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        outs.append([y.detach()] + [t.grad for t in leaves])
    assert outs[0][0].dtype == dtype and outs[0][2].dtype == torch.float32  # y in the operand dtype, dgates fp32
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert outs[1][3][-1].abs().max() == 0 and outs[1][4][-1].abs().max() == 0  # the empty expert
    assert outs[1][3][0].abs().max() > 0


def test_act_fq_without_an_importable_name_is_not_sent_through_the_op():
    def local(h):
        return h

    assert act_fq_name(lambda h: h) is None
    assert act_fq_name(local) is None  # its module has no such name
    assert act_fq_name(fake_quant_act_int8) == "model.quant:fake_quant_act_int8"


def test_op_rejects_bad_inputs_with_one_line_errors():
    x, ids, gates, w13, w2 = _op_inputs(torch.float32)
    with pytest.raises(ValueError, match="resolved backend"):
        moe_experts_op(x, ids, gates, w13, w2, "auto", "")
    with pytest.raises(ValueError, match="gates_TK"):
        moe_experts_op(x, ids, gates[:, :1], w13, w2, "reference", "")
    with pytest.raises(ValueError, match="same T"):
        moe_experts_op(x[1:], ids, gates, w13, w2, "reference", "")


_TRITON_CASE = """
import torch
from kernels.moe import dispatch_experts, moe_experts_op
from tests.test_compile import _op_inputs
for dtype in (torch.float32, torch.bfloat16):
    outs = []
    for use_op in (False, True):
        x, ids, gates, w13, w2 = _op_inputs(dtype)
        leaves = [t.requires_grad_() for t in (x, gates, w13, w2)]
        args = (leaves[0], ids, leaves[1], leaves[2], leaves[3])
        y = moe_experts_op(*args, "triton", "") if use_op else dispatch_experts(*args, "triton")
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [t.grad for t in leaves])
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(*outs)), dtype
print("ok")
"""


def test_op_runs_the_triton_backend_like_the_direct_path():
    """The Triton path through the op (under the Triton interpreter, in its own process so TRITON_INTERPRET is
    set before triton is imported): forward and recompute backward bitwise equal to the direct autograd path."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-c", _TRITON_CASE], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
