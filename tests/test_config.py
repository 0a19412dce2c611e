"""ModelConfig presets, validation and the accounting CLI, checked against real MobileMoE tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import (
    PRESETS,
    ModelConfig,
    accounting,
    count_params,
    flops_per_token,
    get_config,
    int4_weight_bytes,
    kv_cache_bytes,
    param_breakdown,
)
from model.model import MobileMoE
from model.quant import pack_int4, quantize_int4

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"S": (1.3e9, 0.272e9), "M": (2.8e9, 0.528e9), "L": (5.3e9, 0.922e9)}  # (total, active), published

# tiny variants that exercise every accounting branch: untied head, dense layers, a dense model,
# head_dim != d_model / n_heads, several shared experts
VARIANTS = {
    "untied+dense-layer": dict(tie_embeddings=False, dense_layers=(0, 3)),
    "dense-model": dict(n_experts=0, top_k=0),
    "head_dim-64+2shared": dict(head_dim=64, n_shared_experts=2, top_k=3),
}


def _configs():
    out = [get_config(n) for n in PRESETS]
    out += [get_config("tiny", **ov) for ov in VARIANTS.values()]
    return out


def _meta_model(cfg: ModelConfig) -> MobileMoE:
    with torch.device("meta"):
        return MobileMoE(cfg)


def _counts_from_tensors(model: MobileMoE) -> dict[str, int]:
    """Classify every real parameter tensor by its name, independently of model/config.py."""
    cfg = model.cfg
    b = dict(embedding=0, lm_head=0, attention=0, norms=0, router=0, shared=0, routed=0, dense_ffn=0)
    for name, p in model.named_parameters():
        n = p.numel()
        if name == "tok_emb.weight":
            b["embedding"] += n
        elif name == "lm_head.weight":
            b["lm_head"] += n
        elif ".attn." in name:
            b["attention"] += n
        elif name.endswith("norm.weight"):
            b["norms"] += n
        elif ".moe.router." in name:
            b["router"] += n
        elif ".moe.shared." in name:
            b["shared"] += n
        elif ".moe.w_" in name:
            b["routed"] += n
        elif ".ffn." in name:
            b["dense_ffn"] += n
        else:
            raise AssertionError(f"unclassified parameter {name}")
    # active routed weights: each MoE layer's (E, ...) tensors restricted to top_k experts
    b["routed_active"] = sum(
        (layer.moe.w_gate_up.numel() + layer.moe.w_down.numel()) // cfg.n_experts * cfg.top_k
        for layer in model.layers if layer.is_moe)
    return b


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.name}-{c.n_layers}L-{c.n_experts}E-{c.head_dim}hd-"
                         f"{'tied' if c.tie_embeddings else 'untied'}-{len(c.dense_layers)}dense")
def test_accounting_matches_module_tensors(cfg):
    model = _meta_model(cfg)
    actual = _counts_from_tensors(model)
    assert param_breakdown(cfg) == actual
    total, active = count_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - (actual["routed"] - actual["routed_active"])
    # forward FLOPs: 2 per active matmul weight (router, experts, attention, LM head; not norms / lookup)
    matmul = (actual["attention"] + actual["router"] + actual["shared"] + actual["routed_active"]
              + actual["dense_ffn"] + cfg.vocab_size * cfg.d_model)
    assert flops_per_token(cfg, 0) == 2 * matmul
    # the sequence term: QK^T and AV, 2 FLOPs per multiply-add, over n_heads * head_dim per layer
    assert flops_per_token(cfg, 1000) - flops_per_token(cfg, 0) == 2 * 2 * cfg.n_layers * 1000 * cfg.n_heads * cfg.head_dim


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_paper_sizes_within_3_percent_via_cli(size):
    out = subprocess.run([sys.executable, "-m", "model.config", "--size", size, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("total_params", "active_params", "flops_per_token", "int4_bytes"):
        assert key in r and isinstance(r[key], int) and r[key] > 0, key
    assert {"kv_cache_bytes_2k", "kv_cache_bytes_8k"} <= set(r)
    paper_total, paper_active = PAPER[size]
    assert abs(r["total_params"] / paper_total - 1) <= 0.03, (size, r["total_params"])
    assert abs(r["active_params"] / paper_active - 1) <= 0.03, (size, r["active_params"])
    # the CLI reports the same numbers as the library and as the module tensors
    cfg = get_config(size)
    assert (r["total_params"], r["active_params"]) == count_params(cfg)


def test_paper_presets_are_fine_grained_moderately_sparse_with_shared_experts():
    for size in ("S", "M", "L"):
        c = get_config(size)
        assert c.n_shared_experts >= 1 and c.shared_ffn_dim > 0
        assert c.expert_ffn_dim < c.ffn_dim / 4  # fine-grained: much narrower than a dense FFN
        total, active = count_params(c)
        assert 3 <= total / active <= 8  # moderate sparsity (OLMoE-1B-7B is ~5.3)


def test_paper_presets_use_the_published_moe_layer():
    """60 routed + 1 shared expert, top-4, sigmoid with top-k renormalisation, auxiliary-loss-free balancing at
    rate 1e-3, z-loss 1e-4 and no LB loss; 8k context; shapes GPU / INT4 friendly."""
    for size in ("S", "M", "L"):
        c = get_config(size)
        assert (c.n_experts, c.n_shared_experts, c.top_k) == (60, 1, 4), size
        assert (c.router_score, c.norm_topk_prob, c.router_bias_coeff) == ("sigmoid", True, 1e-3), size
        assert (c.lb_loss_weight, c.z_loss_weight) == (0.0, 1e-4), size
        assert c.dense_layers == () and c.max_seq_len == 8192 and c.head_dim == 64, size
        assert c.n_kv_heads < c.n_heads and c.expert_ffn_dim % 32 == 0, size
        # one shared expert as wide as a routed one: what Glm4Moe / llama.cpp glm4moe can express
        assert c.shared_ffn_dim == c.expert_ffn_dim, size


def test_softmax_variants_keep_the_measured_designs():
    """bench/results/*.md measured these under the names S/M/L before the paper presets took the names."""
    for size, (total, active, E, k) in {"S-softmax": (1_298_177_280, 300_391_680, 64, 6),
                                        "M-softmax": (2_831_543_808, 495_840_768, 96, 8),
                                        "L-softmax": (5_324_802_048, 895_617_024, 96, 8)}.items():
        c = get_config(size)
        assert (c.router_score, c.n_experts, c.top_k, c.router_bias_coeff) == ("softmax", E, k, 0.0), size
        assert count_params(c) == (total, active), size


def test_dense_baseline_shape():
    c = get_config("dense-1B")
    assert (c.d_model, c.ffn_dim, c.n_layers, c.head_dim, c.tie_embeddings) == (1280, 6144, 30, 64, True)
    assert 200_000 <= c.vocab_size <= 205_000 and not c.is_moe
    total, active = count_params(c)
    assert total == active and 0.9e9 < total < 1.2e9


def test_tiny_is_a_cpu_demo_size():
    total, _ = count_params(get_config("tiny"))
    assert 1e6 <= total <= 10e6


def test_int4_bytes_equal_packed_tensors():
    """The INT4 byte count equals what quantize + pack actually produce for every matrix, + fp32 router/norms."""
    cfg = get_config("tiny", tie_embeddings=False, dense_layers=(2,))
    model = MobileMoE(cfg)
    nbytes = 0
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or ".router." in name:
            nbytes += p.numel() * 4
        else:
            q, s = quantize_int4(p.detach())
            nbytes += pack_int4(q).numel() + s.numel() * s.element_size()
    assert int4_weight_bytes(cfg)["total"] == nbytes == accounting(cfg)["int4_bytes"]


def test_kv_cache_bytes_match_the_k_v_projection_widths():
    cfg = get_config("tiny")
    model = MobileMoE(cfg)
    per_token = sum(layer.attn.wk.out_features + layer.attn.wv.out_features for layer in model.layers) * 2  # fp16
    assert kv_cache_bytes(cfg, 2048) == per_token * 2048
    r = accounting(get_config("S"))
    assert r["kv_cache_bytes_8k"] == 4 * r["kv_cache_bytes_2k"]


def test_cli_text_and_all_table():
    out = subprocess.run([sys.executable, "-m", "model.config", "--size", "M"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "active params/token" in out.stdout and "KV cache @8k" in out.stdout
    out = subprocess.run([sys.executable, "-m", "model.config", "--all"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "preset" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(PRESETS)


def test_cli_unknown_preset_is_one_line_error():
    out = subprocess.run([sys.executable, "-m", "model.config", "--size", "XXL", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "XXL" in out.stderr


# ---- validation: a ValueError naming the field, at construction ------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(top_k=17), "top_k"),  # tiny has 16 experts
    (dict(d_model=130), "d_model"),
    (dict(n_heads=5), "d_model"),  # 128 % 5
    (dict(n_kv_heads=3), "n_heads"),
    (dict(n_experts=0, top_k=2), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(expert_ffn_dim=0), "expert_ffn_dim"),
    (dict(router_score="relu"), "router_score"),
    (dict(dense_layers=(4,)), "dense_layers"),
    (dict(expert_ffn_dim=48), "expert_ffn_dim"),  # not a multiple of the INT4 group
    (dict(head_dim=3), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(moe_backend="cuda"), "moe_backend"),
])
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        get_config("tiny", **overrides)
    d = {**PRESETS["tiny"], **overrides}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ModelConfig(**d)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ValueError, match="preset"):
        get_config("XL")
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**get_config("tiny").to_dict(), "bogus": 1})


def test_config_dict_round_trip():
    for name in PRESETS:
        c = get_config(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
