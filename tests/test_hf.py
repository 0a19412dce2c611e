"""model/hf.py: a transformers Qwen2MoeForCausalLM (softmax router) or Glm4MoeForCausalLM (sigmoid router +
selection bias) loaded from our export gives our logits (fp32, <= 1e-4), export -> import is bit-exact,
hub-style Qwen2-MoE / Glm4-MoE checkpoints import, and inexpressible features are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import get_config
from model.hf import export_hf, import_hf
from model.hf import main as hf_main
from model.io import load_model_dir, save_model_dir
from model.model import MobileMoE

transformers = pytest.importorskip("transformers")  # a core dependency: in CI a skip here fails the run

# (name, overrides): tiny itself and shapes covering GQA ratios 2 and 4 (never 1 or n_heads), top-k 2/3/4,
# tied and untied embeddings, softmax with and without top-k renormalisation, dense layers, several / no
# shared experts, head_dim != d_model / n_heads.
SHAPES = {
    "tiny": {},
    "gqa4-top3-untied-nonorm-dense1-2shared": dict(
        n_layers=3, n_heads=8, n_kv_heads=2, top_k=3, tie_embeddings=False, norm_topk_prob=False,
        dense_layers=(1,), n_shared_experts=2, vocab_size=512),
    "gqa2-top4-tied-norm-noshared-hd64": dict(
        n_layers=2, d_model=96, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, top_k=4,
        expert_ffn_dim=32, n_shared_experts=0, norm_topk_prob=True, vocab_size=300, rope_theta=500000.0),
}


# sigmoid routing (-> Glm4-MoE) with a non-zero selection bias: the paper presets' router on tiny shapes, plus
# no renormalisation, a leading dense layer, two shared experts, no shared expert, untied embeddings
SIGMOID = dict(router_score="sigmoid", router_bias_coeff=1e-3, lb_loss_weight=0.0, z_loss_weight=1e-4)
GLM_SHAPES = {
    "paper-S-reduced": dict(  # get_config("S") with only the width shrunk: 60 experts, top-4, 1 shared
        base="S", d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, expert_ffn_dim=32, shared_ffn_dim=32,
        vocab_size=256, max_seq_len=64),
    "gqa4-top3-untied-nonorm-dense1-2shared": dict(
        **SIGMOID, n_layers=3, n_heads=8, n_kv_heads=2, top_k=3, tie_embeddings=False, norm_topk_prob=False,
        dense_layers=(0,), n_shared_experts=2, shared_ffn_dim=64, vocab_size=512),
    "gqa2-top4-noshared-hd64": dict(
        **SIGMOID, n_layers=2, d_model=96, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, top_k=4,
        expert_ffn_dim=32, n_shared_experts=0, vocab_size=300, rope_theta=500000.0),
}


def _model(overrides: dict, seed: int = 0) -> MobileMoE:
    overrides = dict(overrides)
    m = MobileMoE(get_config(overrides.pop("base", "tiny"), seed=seed, **overrides)).eval()
    # a sharper router than the init's near-uniform one, so the top-k choice and the renormalisation matter
    with torch.no_grad():
        for layer in m.layers:
            if layer.is_moe:
                layer.moe.router.weight.mul_(40.0)
    return m


def _ids(V: int, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(123))


def _biased(m: MobileMoE, seed: int = 1) -> MobileMoE:
    """A selection bias as training leaves it (entries a few hundredths to tenths), big enough to change
    which experts are picked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.layers:
            if layer.is_moe:
                layer.moe.expert_bias.copy_((torch.rand(m.cfg.n_experts, generator=g) - 0.5) * 0.6)
    return m


def _hf_logits(d: Path, ids: torch.Tensor) -> torch.Tensor:
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    hf = getattr(transformers, arch).from_pretrained(d)
    assert hf.dtype == torch.float32
    with torch.no_grad():
        return hf.eval()(ids).logits


@pytest.mark.parametrize("name", list(SHAPES))
def test_transformers_logit_parity_and_exact_round_trip(tmp_path, name):
    m = _model(SHAPES[name])
    out = export_hf(m, tmp_path / "hf")
    ids = _ids(m.cfg.vocab_size)
    with torch.no_grad():
        ours = m(ids)
    theirs = _hf_logits(out, ids)
    assert theirs.shape == ours.shape
    err = float((theirs - ours).abs().max())
    assert err <= 1e-4, f"{name}: max |logit diff| {err}"
    assert float(ours.abs().max()) > 0.1  # logits are not trivially ~0
    if m.cfg.n_shared_experts:  # the shared expert really contributes: parity covers the 0.5 / x2 trick
        assert float(m.layers[0].moe.shared.w_down.weight.abs().max()) > 0
    back = import_hf(out)
    assert back.cfg == m.cfg
    ref = m.state_dict()
    got = back.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("name", list(GLM_SHAPES))
def test_glm4_moe_logit_parity_and_exact_round_trip(tmp_path, name):
    m = _biased(_model(GLM_SHAPES[name]))
    assert m.cfg.router_score == "sigmoid" and m.cfg.router_bias_coeff > 0
    out = export_hf(m, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["Glm4MoeForCausalLM"] and conf["rope_parameters"]["partial_rotary_factor"] == 1.0
    ids = _ids(m.cfg.vocab_size)
    with torch.no_grad():
        ours = m(ids)
    theirs = _hf_logits(out, ids)
    err = float((theirs - ours).abs().max())
    assert err <= 1e-4, f"{name}: max |logit diff| {err}"
    assert float(ours.abs().max()) > 0.1
    back = import_hf(out)
    assert back.cfg == m.cfg
    ref, got = m.state_dict(), back.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("key, value", [("bias", 0.0), ("partial_rotary_factor", 0.5), ("norm_topk_prob", None)])
def test_glm4_moe_parity_is_sensitive_to_bias_rope_and_renormalisation(tmp_path, key, value):
    """Zeroing the exported selection bias, Glm4-MoE's default half-head RoPE, or flipping the
    renormalisation moves the transformers logits far beyond 1e-4: the parity above checks each."""
    m = _biased(_model(GLM_SHAPES["paper-S-reduced"]))
    out = export_hf(m, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    del conf["mobilemoe"]
    if key == "bias":
        sd = load_file(str(out / "model.safetensors"))
        sd = {k: (v * value if k.endswith("e_score_correction_bias") else v) for k, v in sd.items()}
        save_file(sd, str(out / "model.safetensors"))
    elif key == "partial_rotary_factor":
        conf["rope_parameters"][key] = value
        conf[key] = value
    else:
        conf[key] = not conf[key]
    (out / "config.json").write_text(json.dumps(conf))
    ids = _ids(m.cfg.vocab_size)
    with torch.no_grad():
        assert float((_hf_logits(out, ids) - m(ids)).abs().max()) > 1e-3


def _glm_hub_checkpoint(path: Path, **over) -> tuple[Path, object]:
    """A Glm4-MoE written by transformers itself (save_pretrained): layer 0 dense, a non-zero bias, no metadata."""
    conf = transformers.Glm4MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=6,
        num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=256,
        first_k_dense_replace=1, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}, **over)
    torch.manual_seed(0)
    hf = transformers.Glm4MoeForCausalLM(conf).eval()
    with torch.no_grad():
        gate = hf.model.layers[1].mlp.gate
        gate.weight.normal_(0, 0.5)
        gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    hf.save_pretrained(path)
    return path, hf


def test_import_transformers_written_glm4_moe(tmp_path):
    path, hf = _glm_hub_checkpoint(tmp_path / "hub")
    m = import_hf(path)
    c = m.cfg
    assert (c.router_score, c.dense_layers, c.n_shared_experts, c.shared_ffn_dim) == ("sigmoid", (0,), 1, 32)
    assert c.router_bias_coeff > 0 and bool(m.layers[1].moe.expert_bias.ne(0).any())
    ids = _ids(128)
    with torch.no_grad():
        assert float((hf(ids).logits - m(ids)).abs().max()) <= 1e-4


@pytest.mark.parametrize("over, match", [(dict(use_qk_norm=True), "use_qk_norm"),
                                         (dict(attention_bias=True), "attention_bias"),
                                         (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
                                         (dict(n_group=2, topk_group=1), "group-limited")])
def test_import_refuses_inexpressible_glm4_moe(tmp_path, over, match):
    path, _ = _glm_hub_checkpoint(tmp_path / "hub", **over)
    with pytest.raises(ValueError, match=match):
        import_hf(path)


def test_import_refuses_partial_rope_glm4_moe(tmp_path):
    path, _ = _glm_hub_checkpoint(tmp_path / "hub")
    conf = json.loads((path / "config.json").read_text())
    conf["rope_parameters"]["partial_rotary_factor"] = 0.5
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        import_hf(path)


def test_dense_model_parity(tmp_path):
    m = _model(dict(n_experts=0, top_k=0, n_layers=2, vocab_size=256, tie_embeddings=False))
    out = export_hf(m, tmp_path / "hf")
    ids = _ids(256)
    with torch.no_grad():
        assert float((_hf_logits(out, ids) - m(ids)).abs().max()) <= 1e-4
    assert import_hf(out).cfg == m.cfg


def test_parity_test_is_sensitive_to_norm_topk_prob(tmp_path):
    """Flipping norm_topk_prob in the exported config moves the transformers logits far beyond 1e-4,
    so the parity above really checks the renormalisation (and the router) and is not vacuous."""
    m = _model(SHAPES["gqa4-top3-untied-nonorm-dense1-2shared"])
    out = export_hf(m, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    conf["norm_topk_prob"] = True
    del conf["mobilemoe"]
    (out / "config.json").write_text(json.dumps(conf))
    ids = _ids(m.cfg.vocab_size)
    with torch.no_grad():
        assert float((_hf_logits(out, ids) - m(ids)).abs().max()) > 1e-3  # >= 10x the parity bound


def _hub_style_checkpoint(path: Path, gate_value: float = 0.0, bias_value: float = 0.0) -> tuple[Path, object]:
    """A Qwen2-MoE written by transformers itself (save_pretrained), with zero q/k/v biases and shared gate."""
    conf = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False, max_position_embeddings=256,
        decoder_sparse_step=2)  # layer 0 dense, layer 1 MoE
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(conf).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.fill_(bias_value)
            if hasattr(layer.mlp, "shared_expert_gate"):
                layer.mlp.shared_expert_gate.weight.fill_(gate_value)
                layer.mlp.gate.weight.normal_(0, 0.5)
    hf.save_pretrained(path)
    return path, hf


def test_import_transformers_written_checkpoint(tmp_path):
    path, hf = _hub_style_checkpoint(tmp_path / "hub")
    m = import_hf(path)
    assert m.cfg.dense_layers == (0,) and m.cfg.n_shared_experts == 1 and not m.cfg.norm_topk_prob
    ids = _ids(128)
    with torch.no_grad():
        ref = hf(ids).logits
        assert float((ref - m(ids)).abs().max()) <= 1e-4
    # the same weights as a sharded checkpoint, and in transformers' fused in-memory expert layout
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    for p in (tmp_path / "sharded", fused):
        other = import_hf(p)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in m.state_dict().items()), p.name


@pytest.mark.parametrize("kw, match", [(dict(gate_value=0.1), "shared_expert_gate"),
                                       (dict(bias_value=0.1), "q_proj.bias")])
def test_import_refuses_inexpressible_checkpoints(tmp_path, kw, match):
    path, _ = _hub_style_checkpoint(tmp_path / "hub", **kw)
    with pytest.raises(ValueError, match=match):
        import_hf(path)


def test_import_refuses_bad_input(tmp_path):
    m = _model(dict(n_layers=1, vocab_size=128))
    out = export_hf(m, tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        import_hf(out)
    (out / "config.json").write_text(json.dumps({**conf, "hidden_size": 64, "mobilemoe": None}))
    with pytest.raises(ValueError, match="shape"):
        import_hf(out)
    (out / "config.json").write_text(json.dumps({**conf, "num_experts_per_tok": 5}))
    with pytest.raises(ValueError, match="top_k"):  # metadata disagrees with the Qwen2-MoE fields
        import_hf(out)
    (out / "config.json").write_text(json.dumps(conf))
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        import_hf(out)
    with pytest.raises(FileNotFoundError):
        import_hf(tmp_path / "missing")


def test_export_refuses_inexpressible_features(tmp_path):
    m = _model(dict(SIGMOID, n_layers=3, vocab_size=128, dense_layers=(1,)))
    with pytest.raises(ValueError, match="Glm4-MoE cannot express dense_layers"):
        export_hf(m, tmp_path / "a")
    m = _model(dict(SIGMOID, n_layers=1, vocab_size=128, shared_ffn_dim=96))  # 96 is not a multiple of 64
    with pytest.raises(ValueError, match="shared width"):
        export_hf(m, tmp_path / "a")
    m = _model(dict(n_layers=1, vocab_size=128, router_bias_coeff=1e-3))
    export_hf(m, tmp_path / "b")  # a zero bias selects exactly like no bias: expressible
    m.layers[0].moe.expert_bias[0] = 0.5
    with pytest.raises(ValueError, match="expert_bias"):
        export_hf(m, tmp_path / "c")
    m = _model(dict(n_layers=1, vocab_size=128)).set_qat(True)
    with pytest.raises(ValueError, match="QAT"):
        export_hf(m, tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_cli_export_import(tmp_path, capsys):
    m = _model(dict(n_layers=1, vocab_size=128))
    save_model_dir(m, tmp_path / "ours")
    assert hf_main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert hf_main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, _ = load_model_dir(tmp_path / "back")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    capsys.readouterr()
    assert hf_main(["export", str(tmp_path / "nope"), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err and not (tmp_path / "hf2").exists()
