"""MobileMoE forward: shapes, aux outputs, causality, dropless routing, deterministic init, QAT."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import get_config
from model.model import MobileMoE


def _cfg(**ov):
    base = dict(n_layers=2, vocab_size=256, max_seq_len=64)
    return get_config("tiny", **{**base, **ov})


def _ids(B, T, V=256, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_aux():
    cfg = _cfg(dense_layers=(1,), n_layers=3)
    m = MobileMoE(cfg)
    logits = m(_ids(2, 11))
    assert logits.shape == (2, 11, 256) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    aux = m.aux
    assert set(aux) >= {"lb_loss", "z_loss", "expert_counts", "router_entropy"}
    counts = aux["expert_counts"]
    assert counts.shape == (cfg.n_moe_layers, cfg.n_experts) == (2, 16)
    assert (counts.sum(-1) == 2 * 11 * cfg.top_k).all()  # dropless: every token reaches all k experts
    # LB loss is E * sum f_e P_e: 1.0 for perfectly uniform routing, >= ~1 in general; z-loss positive
    assert 0.5 < float(aux["lb_loss"]) < cfg.n_experts and float(aux["z_loss"]) > 0
    assert 0 < float(aux["router_entropy"]) <= math.log(cfg.n_experts) + 1e-5
    loss = m.aux_loss()
    assert loss.requires_grad
    loss.backward()
    assert m.layers[0].moe.router.weight.grad.abs().sum() > 0


def test_causal_and_tokens_independent_across_batch():
    m = MobileMoE(_cfg()).eval()
    ids = _ids(3, 16)
    with torch.no_grad():
        full = m(ids)
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 256
        changed = m(ids2)
        # changing position 10 cannot affect positions < 10 (causal) but does affect 10 onwards
        torch.testing.assert_close(changed[:, :10], full[:, :10], rtol=0, atol=1e-6)
        assert (changed[:, 10:] - full[:, 10:]).abs().max() > 1e-4
        # dropless routing, no capacity: a sequence's logits do not depend on the rest of the batch
        for b in range(3):
            torch.testing.assert_close(m(ids[b:b + 1])[0], full[b], rtol=1e-5, atol=1e-5)


def test_init_deterministic_from_seed_and_scaled_residuals():
    a, b, c = MobileMoE(_cfg(seed=1)), MobileMoE(_cfg(seed=1)), MobileMoE(_cfg(seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["layers.0.attn.wq.weight"], sc["layers.0.attn.wq.weight"])
    cfg = get_config("tiny", n_layers=8, vocab_size=256)
    m = MobileMoE(cfg)
    std, res = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    moe = m.layers[0].moe
    for w, want in ((m.layers[0].attn.wq.weight, std), (moe.w_gate_up, std), (m.tok_emb.weight, std),
                    (m.layers[0].attn.wo.weight, res), (moe.w_down, res), (moe.shared.w_down.weight, res)):
        assert abs(float(w.std()) / want - 1) < 0.1
    assert torch.equal(m.layers[0].attn_norm.weight, torch.ones(cfg.d_model))
    assert torch.count_nonzero(moe.expert_bias) == 0


def test_meta_device_build_has_no_storage():
    with torch.device("meta"):
        m = MobileMoE(get_config("L"))
    assert all(p.is_meta for p in m.parameters())


def test_too_long_sequence_is_value_error():
    m = MobileMoE(_cfg(max_seq_len=32))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(_ids(1, 33))


def test_dense_model_and_untied_head():
    m = MobileMoE(_cfg(n_experts=0, top_k=0, tie_embeddings=False))
    assert m.lm_head is not None and not any(layer.is_moe for layer in m.layers)
    out = m(_ids(1, 8))
    assert out.shape == (1, 8, 256) and m.aux["expert_counts"] is None and float(m.aux_loss()) == 0


def test_qat_changes_outputs_slightly_and_trains():
    m = MobileMoE(_cfg()).eval()
    ids = _ids(2, 12)
    with torch.no_grad():
        ref = m(ids)
    m.set_qat(True)
    assert all(getattr(mod, "qat", True) for mod in m.modules() if hasattr(mod, "qat"))
    q = m(ids)
    diff = (q - ref).abs().max()
    assert 0 < float(diff) < 0.1 * float(ref.abs().max())
    q.float().logsumexp(-1).mean().backward()  # the STE lets gradients reach the latent fp32 weights
    assert m.layers[0].moe.w_gate_up.grad.abs().sum() > 0 and m.tok_emb.weight.grad.abs().sum() > 0
    m.set_qat(False)
    with torch.no_grad():
        assert torch.equal(m(ids), ref)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_bias_changes_selection_not_gates(score, monkeypatch):
    import model.model as mm  # noqa: PLC0415

    m = MobileMoE(_cfg(router_bias_coeff=1e-3, n_layers=1, router_score=score)).eval()
    moe, ids = m.layers[0].moe, _ids(1, 32)
    seen = {}

    def route_spy(logits_TE, *a, **kw):
        seen["logits"] = logits_TE.detach().clone()
        return mm_route(logits_TE, *a, **kw)

    def experts_spy(x_TD, ids_TK, gates_TK, *a, **kw):
        seen["ids"], seen["gates"] = ids_TK.clone(), gates_TK.detach().clone()
        return mm_experts(x_TD, ids_TK, gates_TK, *a, **kw)

    mm_route, mm_experts = mm.route, mm.moe_experts
    monkeypatch.setattr(mm, "route", route_spy)
    monkeypatch.setattr(mm, "moe_experts", experts_spy)
    with torch.no_grad():
        m(ids)
        before = m.aux["expert_counts"].clone()
        moe.expert_bias[3] = 10.0  # expert 3 now wins every selection
        m(ids)
    assert int(m.aux["expert_counts"][0, 3]) == 32 and int(before[0, 3]) < 32
    assert (seen["ids"] == 3).any(-1).all()
    # the gates the experts are weighted by: the UNBIASED scores at the selected ids, renormalised over them.
    # A bias that leaked into the gates would put expert 3's gate near 1 (its biased score dwarfs the rest).
    scores_TE = torch.softmax(seen["logits"], -1) if score == "softmax" else torch.sigmoid(seen["logits"])
    picked_TK = scores_TE.gather(1, seen["ids"])
    torch.testing.assert_close(seen["gates"], picked_TK / picked_TK.sum(-1, keepdim=True))
    gate3_T = seen["gates"][seen["ids"] == 3]
    assert float(gate3_T.max()) < 0.9, gate3_T
    # no gradient reaches the bias: it only ranks experts (a non-differentiable sort), it never scales a gate
    m.train()
    moe.expert_bias.requires_grad_(True)
    out = m(ids)
    (out.float().logsumexp(-1).mean() + m.aux_loss()).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0  # the graph is live
    assert moe.expert_bias.grad is None or not moe.expert_bias.grad.any(), moe.expert_bias.grad
    moe.expert_bias.requires_grad_(False)
    # the bias update pushes over-loaded experts down
    m.update_router_bias()
    assert float(moe.expert_bias[3]) < 10.0


def test_generate_greedy_is_deterministic():
    m = MobileMoE(_cfg()).eval()
    a = m.generate([1, 2, 3], 5)
    assert a == m.generate([1, 2, 3], 5) and len(a) == 5
    assert all(0 <= t < 256 for t in m.generate([1, 2, 3], 4, temperature=1.0, top_p=0.9, seed=1))
