"""The phone engine runs the paper presets' router: sigmoid scores, selection on score + the auxiliary-loss-free
bias, gates from the unbiased scores renormalised over the top 4. Engine vs the PyTorch fake-quant (QAT) model on
a random-init tiny model with that router and a non-zero bias; the tolerance argument is tests/test_mobile_parity.py's
(same quantized arithmetic, fp32 summation order only), the expert selection is exactly torch's while no int8
code has flipped, and greedy decoding agrees until a step where torch's own choice is a near-tie."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests._mobile_util import ROOT, build_engine

PROMPT = [5, 17, 300, 1000, 42, 7, 99, 1234, 3, 2047, 0, 512, 64, 1999, 808, 77]
# the S/M/L router on tiny's shapes: sigmoid, top-4 renormalised, bias on, one shared expert of the routed width
PAPER_ROUTER = dict(router_score="sigmoid", norm_topk_prob=True, router_bias_coeff=1e-3, lb_loss_weight=0.0,
                    z_loss_weight=1e-4, top_k=4, shared_ffn_dim=64)


def _export(model, d, name):
    from model.io import save_model_dir

    save_model_dir(model, d / name)
    r = subprocess.run([sys.executable, "-m", "mobile", "export", "--ckpt", str(d / name), "--out",
                        str(d / f"{name}.mmoe")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return d / f"{name}.mmoe"


@pytest.fixture(scope="module")
def sigmoid_tiny(tmp_path_factory):
    import torch

    from model.config import get_config
    from model.model import MobileMoE

    build_engine()
    d = tmp_path_factory.mktemp("sigmoid")
    # seed 2: its 64 greedy tokens visit 14 distinct ids (seed 1 settles on one token after a few steps)
    model = MobileMoE(get_config("tiny", init_std=0.1, seed=2, **PAPER_ROUTER)).set_qat(True).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:  # a bias as balancing leaves it, large enough to change the selection
            layer.moe.expert_bias.copy_((torch.rand(model.cfg.n_experts, generator=g) - 0.5) * 0.6)
    path = _export(model, d, "biased")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model(torch.tensor([PROMPT]))[0].numpy()
            ref_greedy = model.generate(PROMPT[:8], 64)
            for layer in model.layers:
                layer.moe.expert_bias.zero_()
            unbiased = model(torch.tensor([PROMPT]))[0].numpy()
            g = torch.Generator().manual_seed(3)
            for layer in model.layers:  # the same bias back, for the teacher-forced comparison
                layer.moe.expert_bias.copy_((torch.rand(model.cfg.n_experts, generator=g) - 0.5) * 0.6)
    finally:
        torch.set_num_threads(n)
    return path, ref, ref_greedy, unbiased, model


def test_sigmoid_biased_router_logits_match_fake_quant_model(sigmoid_tiny):
    from mobile import Engine

    path, ref, _, unbiased, _ = sigmoid_tiny
    std, amax = float(ref.std()), float(np.abs(ref).max())
    for float_path in (False, True):
        with Engine(path, float_path=float_path) as eng:
            got = eng.eval(PROMPT, all_logits=True)
        d = np.abs(got - ref)
        assert d.max() <= 0.1 * std, (float_path, d.max(), std)
        assert d[:4].max() <= 1e-4 * amax, (float_path, d[:4].max(axis=-1))
    # the bias really changes the model: without it torch's own logits move far beyond the parity bound
    assert np.abs(unbiased - ref)[:4].max() > 100 * 1e-4 * amax


def test_sigmoid_biased_routing_selects_torchs_experts(sigmoid_tiny):
    """Expert selection is discrete, so it must match exactly: over the first 4 prompt tokens (where the logits
    agree to 1e-4 of their range, i.e. no int8 code has flipped) the engine routes every (token, k) slot of every
    layer to the experts torch picks, and those differ from what the same router picks without the bias."""
    import torch

    from mobile import Engine

    path, _, _, _, model = sigmoid_tiny
    with torch.no_grad():
        model(torch.tensor([PROMPT[:4]]))
        want = model.aux["expert_counts"].long().numpy()  # (MoE layers, E)
        saved = [layer.moe.expert_bias.clone() for layer in model.layers]
        for layer in model.layers:
            layer.moe.expert_bias.zero_()
        model(torch.tensor([PROMPT[:4]]))
        unbiased = model.aux["expert_counts"].long().numpy()
        for layer, b in zip(model.layers, saved):
            layer.moe.expert_bias.copy_(b)
    with Engine(path) as eng:
        eng.expert_counts_reset()
        eng.eval(PROMPT[:4])
        got = np.stack(eng.expert_counts())
    assert want.sum() == 4 * model.cfg.top_k * model.cfg.n_moe_layers
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(unbiased, want)  # the bias changes the selection on this prompt


def test_sigmoid_biased_router_greedy_decoding_agrees(sigmoid_tiny):
    """Greedy decoding: the engine's 64 tokens equal torch's up to the first step, if any, where torch's own
    top-1 margin lies inside the parity bound (a near-tie that an int8 code flip may break either way; on this
    model that happens at step 16, margin 0.001 against an engine-torch logit difference of 0.08)."""
    import torch

    from mobile import Engine

    path, ref, ref_greedy, _, model = sigmoid_tiny
    bound = 0.1 * float(ref.std())
    with Engine(path) as eng:
        got = eng.generate(PROMPT[:8], 64, greedy=True).ids
    assert len(set(ref_greedy)) >= 8  # a non-trivial trajectory
    first = next((i for i in range(64) if got[i] != ref_greedy[i]), 64)
    assert first >= 8, (first, got, ref_greedy)
    if first < 64:
        with torch.no_grad():  # torch's logits for the step that diverged
            lt = model(torch.tensor([PROMPT[:8] + ref_greedy[:first]]))[0, -1].numpy()
        top2 = np.sort(lt)[-2:]
        assert top2[1] - top2[0] <= bound, (first, top2, bound)
