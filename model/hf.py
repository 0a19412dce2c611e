"""Hugging Face interop: MobileMoE <-> a transformers checkpoint, in the architecture that computes our model
exactly: `Glm4MoeForCausalLM` for sigmoid routing (the paper presets S/M/L), `Qwen2MoeForCausalLM` for softmax
routing and dense models.

    python -m model.hf export <model_dir> <hf_dir> [--force]   # model/io.py directory -> transformers checkpoint
    python -m model.hf import <hf_dir> <model_dir> [--force]   # Qwen2-MoE / Glm4-MoE checkpoint -> model/io.py directory

The output folder is written atomically and replaced only when it is empty or a previous output of the same
command (model/atomic.py); anything else is refused with a one-line error unless --force.

Both mappings are exact (fp32 logits agree to float rounding; tests/test_hf.py checks <= 1e-4).

Glm4-MoE (router_score = "sigmoid"). Its forward, read in transformers' modeling_glm4_moe.py, against ours:
  router      fp32 logits, sigmoid scores, selection on scores + e_score_correction_bias (= our selection-only
              expert_bias), gates gathered from the unbiased scores, renormalised when norm_topk_prob (theirs
              adds 1e-20 to the sum, ours clamps it at 1e-20: equal unless the k scores sum below ~1e-13),
              times routed_scaling_factor (written 1.0). Group-limited routing is off: n_group = topk_group = 1
              (their group score is a top-2 sum, so the experts need E >= 2). Exact ties in the selection may go
              to a different expert (their topk vs our stable sort); continuous scores do not tie.
  experts     SwiGLU, per-expert gate/up/down; gates multiply each expert's output (ours: its F-side input;
              the same product up to rounding).
  shared      `shared_experts`, an ungated SwiGLU of width n_shared_experts * moe_intermediate_size, added to
              the routed output: our shared width must be a multiple of the routed expert width (the presets
              use one shared expert as wide as a routed one).
  attention   q/k/v/o without biases (attention_bias false), no q/k norm (use_qk_norm false), GQA, rotate-half
              RoPE over the whole head (partial_rotary_factor 1.0; Glm4-MoE's default is 0.5).
  layers      pre-norm residual blocks, RMSNorm (weight * x / rms); the first first_k_dense_replace layers are
              dense SwiGLU (intermediate_size = ffn_dim): our dense_layers must lead the stack.
  extras      num_nextn_predict_layers 0 (no MTP layer); on import, tensors of MTP layers past
              num_hidden_layers are ignored, as transformers' forward ignores them.
  names       model.layers.N.mlp.gate.{weight, e_score_correction_bias}, mlp.experts.E.{gate,up,down}_proj,
              mlp.shared_experts.{gate,up,down}_proj, self_attn.{q,k,v,o}_proj, input_layernorm,
              post_attention_layernorm (per-expert layout, what save_pretrained writes).

Qwen2-MoE (router_score = "softmax", and dense models):
  tok_emb / norm / lm_head      -> model.embed_tokens / model.norm / lm_head (omitted when tied)
  attn.{wq,wk,wv,wo}            -> self_attn.{q,k,v,o}_proj; q/k/v get zero biases (Qwen2 has them)
  moe.router                    -> mlp.gate (softmax + top-k + optional renormalisation, as ours)
  moe.w_gate_up (E, 2F, D)      -> mlp.experts.N.{gate_proj = rows [0,F), up_proj = rows [F,2F)}
  moe.w_down (E, D, F)          -> mlp.experts.N.down_proj
  moe.shared (all shared experts, already fused into one SwiGLU of width n_shared * shared_ffn_dim)
                                -> mlp.shared_expert; Qwen2-MoE multiplies it by sigmoid(shared_expert_gate(x)),
                                   so the gate is written as zeros (sigmoid(0) = 0.5) and down_proj as 2x ours
                                   (x2 and /2 are exact in floating point, so the round trip is bit-exact).
                                   No shared expert -> shared_expert_intermediate_size 0.
  dense_layers / ffn            -> mlp_only_layers / mlp.{gate,up,down}_proj (intermediate_size = ffn_dim)
On disk the experts use the per-expert key layout of hub checkpoints (what `save_pretrained` writes);
`import_hf` also reads the fused in-memory layout (`mlp.experts.gate_up_proj` / `down_proj`) and sharded
checkpoints (model.safetensors.index.json).

What the chosen architecture cannot express makes export fail with a ValueError naming the feature: QAT fake
quantization (either), a non-zero selection bias under softmax (Qwen2-MoE), dense layers that do not lead
the stack, a shared width that is not a multiple of the expert width, or E < 2 (Glm4-MoE). Import refuses
checkpoints whose forward we cannot reproduce (token-dependent shared_expert_gate, non-zero q/k/v biases,
q/k norm, partial RoPE, routed_scaling_factor != 1, group-limited routing, sliding-window attention, RoPE
scaling, an activation other than SiLU).

config.json also carries our full ModelConfig under the key "mobilemoe" (transformers keeps unknown keys),
so training-only fields (loss weights, seed, backend, the bias update rate, how the shared width splits into
experts) survive a round trip; the architecture fields are always taken from, and checked against, the
transformers fields. A Glm4-MoE checkpoint without that key and with a non-zero e_score_correction_bias
imports with router_bias_coeff = 1e-3 (the paper's rate), which is what makes our router apply the bias.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.atomic import check_dir_target, dir_has_only, publish_dir
from model.config import ModelConfig
from model.model import MobileMoE

ARCH = "Qwen2MoeForCausalLM"
GLM_ARCH = "Glm4MoeForCausalLM"
META_KEY = "mobilemoe"
# ModelConfig fields that define the forward pass: on import they come from the transformers fields and the
# "mobilemoe" metadata must agree with them.
_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "norm_eps",
                "tie_embeddings", "n_experts", "top_k", "expert_ffn_dim", "dense_layers", "router_score",
                "norm_topk_prob", "max_seq_len")


def _unsupported(feature: str, why: str, arch: str = "Qwen2-MoE") -> ValueError:
    return ValueError(f"{arch} cannot express {feature}: {why}")


def uses_glm4_moe(cfg: ModelConfig) -> bool:
    """Sigmoid-routed MoE models go out as Glm4-MoE; softmax MoE and dense models as Qwen2-MoE."""
    return cfg.is_moe and cfg.router_score == "sigmoid"


# ------------------------------------------------------------------------------------------------------
# export
def check_exportable(model: MobileMoE) -> None:
    """Raise ValueError naming the first feature of `model` that its transformers architecture (Glm4-MoE for
    sigmoid routing, Qwen2-MoE otherwise) cannot express."""
    cfg = model.cfg
    arch = "Glm4-MoE" if uses_glm4_moe(cfg) else "Qwen2-MoE"
    if getattr(model, "qat", False):
        raise _unsupported("QAT fake quantization", "transformers would run the float weights without the INT4/int8 "
                           "rounding; call model.set_qat(False) to export the float (latent) weights", arch)
    if uses_glm4_moe(cfg):
        if tuple(sorted(cfg.dense_layers)) != tuple(range(len(cfg.dense_layers))):
            raise _unsupported(f"dense_layers={cfg.dense_layers}", "its dense layers are the first "
                               "first_k_dense_replace layers only", arch)
        if (cfg.n_shared_experts * cfg.shared_ffn_dim) % cfg.expert_ffn_dim:
            raise _unsupported(f"a shared width of {cfg.n_shared_experts}x{cfg.shared_ffn_dim}",
                               f"its shared expert is n_shared_experts x moe_intermediate_size wide, and "
                               f"{cfg.n_shared_experts * cfg.shared_ffn_dim} is not a multiple of "
                               f"expert_ffn_dim={cfg.expert_ffn_dim}", arch)
        if cfg.n_experts < 2:
            raise _unsupported(f"n_experts={cfg.n_experts}", "its router scores groups by their top-2 experts", arch)
        return
    if cfg.is_moe and cfg.router_bias_coeff > 0:
        for i, layer in enumerate(model.layers):
            if layer.is_moe and bool(layer.moe.expert_bias.ne(0).any()):
                raise _unsupported("the auxiliary-loss-free expert_bias",
                                   f"layer {i} has a non-zero selection bias and its softmax router has no bias")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The Qwen2MoeConfig fields (as config.json holds them) for a ModelConfig."""
    n_exp = cfg.n_experts
    return dict(
        architectures=[ARCH], model_type="qwen2_moe", dtype="float32",
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_theta=float(cfg.rope_theta),  # the pre-5.0 spelling, read by older transformers and by llama.cpp's converter
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        use_sliding_window=False, sliding_window=None, attention_dropout=0.0, qkv_bias=True,
        intermediate_size=cfg.ffn_dim,
        num_experts=n_exp, num_experts_per_tok=cfg.top_k if n_exp else 1,
        moe_intermediate_size=cfg.expert_ffn_dim if n_exp else 0,
        shared_expert_intermediate_size=cfg.n_shared_experts * cfg.shared_ffn_dim if n_exp else 0,
        norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
        # a dense model (no experts) has every layer dense; Qwen2-MoE builds an MLP when num_experts == 0
        mlp_only_layers=sorted(cfg.dense_layers) if n_exp else list(range(cfg.n_layers)),
        router_aux_loss_coef=cfg.lb_loss_weight, output_router_logits=False, use_cache=True,
        layer_types=["full_attention"] * cfg.n_layers,
    )


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _common_state_dict(model: MobileMoE, qkv_bias: bool) -> tuple[dict[str, torch.Tensor], list[tuple[str, object]]]:
    """The tensors Qwen2-MoE and Glm4-MoE name alike (embedding, norms, attention, dense FFNs, router, routed
    experts in the per-expert layout), fp32 on CPU, and (prefix, moe) per MoE layer for the architecture's own
    router-bias and shared-expert tensors."""
    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _t(model.tok_emb.weight),
                                   "model.norm.weight": _t(model.norm.weight)}
    if model.lm_head is not None:
        sd["lm_head.weight"] = _t(model.lm_head.weight)
    moes = []
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _t(layer.attn_norm.weight)
        sd[p + "post_attention_layernorm.weight"] = _t(layer.ffn_norm.weight)
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            w = getattr(layer.attn, ours).weight
            sd[p + f"self_attn.{theirs}_proj.weight"] = _t(w)
            if qkv_bias and theirs != "o":
                sd[p + f"self_attn.{theirs}_proj.bias"] = torch.zeros(w.shape[0])
        if not layer.is_moe:
            _put_swiglu(sd, p + "mlp.", layer.ffn, _t, down_scale=1.0)
            continue
        moe = layer.moe
        sd[p + "mlp.gate.weight"] = _t(moe.router.weight)
        Fe = cfg.expert_ffn_dim
        for e in range(cfg.n_experts):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = _t(moe.w_gate_up[e, :Fe])
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = _t(moe.w_gate_up[e, Fe:])
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = _t(moe.w_down[e])
        moes.append((p, moe))
    return sd, moes


def _put_shared(sd: dict, prefix: str, moe, d_model: int, down_scale: float) -> None:
    if moe.shared is not None:
        _put_swiglu(sd, prefix, moe.shared, _t, down_scale=down_scale)
    else:  # a zero-width shared expert contributes exactly 0
        sd[prefix + "gate_proj.weight"] = torch.zeros(0, d_model)
        sd[prefix + "up_proj.weight"] = torch.zeros(0, d_model)
        sd[prefix + "down_proj.weight"] = torch.zeros(d_model, 0)


def hf_state_dict(model: MobileMoE) -> dict[str, torch.Tensor]:
    """Our weights under Qwen2-MoE's on-disk names (per-expert layout), fp32, contiguous, on CPU."""
    D = model.cfg.d_model
    sd, moes = _common_state_dict(model, qkv_bias=True)
    for p, moe in moes:
        # zero gate -> sigmoid(0) = 0.5 for every token; the doubled down-projection cancels it exactly
        sd[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, D)
        _put_shared(sd, p + "mlp.shared_expert.", moe, D, down_scale=2.0)
    return sd


def _put_swiglu(sd: dict, prefix: str, mlp, t, down_scale: float) -> None:
    gate, up = t(mlp.w_gate_up.weight).chunk(2, dim=0)
    sd[prefix + "gate_proj.weight"] = gate.contiguous()
    sd[prefix + "up_proj.weight"] = up.contiguous()
    sd[prefix + "down_proj.weight"] = t(mlp.w_down.weight) * down_scale


def glm_config_dict(cfg: ModelConfig) -> dict:
    """The Glm4MoeConfig fields (as config.json holds them) for a sigmoid-routed ModelConfig."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta), "partial_rotary_factor": 1.0}
    return dict(
        architectures=[GLM_ARCH], model_type="glm4_moe", dtype="float32",
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        # the pre-5.0 spellings, read by older transformers and by llama.cpp's converter
        rope_theta=float(cfg.rope_theta), partial_rotary_factor=1.0,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        attention_bias=False, attention_dropout=0.0, use_qk_norm=False,
        intermediate_size=cfg.ffn_dim,
        n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.expert_ffn_dim,
        n_shared_experts=cfg.n_shared_experts * cfg.shared_ffn_dim // cfg.expert_ffn_dim,
        first_k_dense_replace=len(cfg.dense_layers), norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0,
        output_router_logits=False, use_cache=True,
    )


def glm_state_dict(model: MobileMoE) -> dict[str, torch.Tensor]:
    """Our weights under Glm4-MoE's on-disk names (per-expert layout), fp32, contiguous, on CPU."""
    cfg = model.cfg
    sd, moes = _common_state_dict(model, qkv_bias=False)
    for p, moe in moes:
        # our router ignores the buffer unless the bias is on; an off bias is written as the zeros it acts as
        bias = moe.expert_bias if cfg.router_bias_coeff > 0 else torch.zeros_like(moe.expert_bias)
        sd[p + "mlp.gate.e_score_correction_bias"] = _t(bias)
        _put_shared(sd, p + "mlp.shared_experts.", moe, cfg.d_model, down_scale=1.0)
    return sd


HF_EXPORT_KIND = "hf-export"
HF_EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json"}


def _legacy_hf_export(p: Path) -> bool:
    """An export_hf folder written before model/atomic.py's marker existed: exactly its files, and a
    config.json carrying our metadata key."""
    if not dir_has_only(p, HF_EXPORT_FILES, {"config.json", "model.safetensors"}):
        return False
    try:
        return META_KEY in json.loads((p / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_hf_target(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Raise TargetExistsError unless export_hf may write `out_dir` (the CLI checks before loading the model)."""
    check_dir_target(out_dir, kind=HF_EXPORT_KIND, legacy=_legacy_hf_export, force=force)


def export_hf(model: MobileMoE, out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None,
              force: bool = False) -> Path:
    """Write `model` as a transformers checkpoint (config.json + model.safetensors [+ tokenizer.json]):
    Glm4MoeForCausalLM for a sigmoid router, Qwen2MoeForCausalLM otherwise. Atomic. Raises ValueError naming
    any feature that architecture cannot express, and TargetExistsError when `out_dir` holds anything but a
    previous export (unless force=True)."""
    check_exportable(model)
    check_hf_target(out_dir, force)
    glm = uses_glm4_moe(model.cfg)
    conf = glm_config_dict(model.cfg) if glm else hf_config_dict(model.cfg)
    conf[META_KEY] = model.cfg.to_dict()
    state = glm_state_dict(model) if glm else hf_state_dict(model)
    with publish_dir(out_dir, kind=HF_EXPORT_KIND, legacy=_legacy_hf_export, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(conf, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------------
# import
def _read_hf_state(p: Path) -> dict[str, torch.Tensor]:
    index = p / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(str(p / f)))
            return state
        if (p / "model.safetensors").is_file():
            return load_file(str(p / "model.safetensors"))
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on corrupt files)
        raise ValueError(f"{p}: unreadable safetensors ({e})") from e
    raise FileNotFoundError(f"{p}: no model.safetensors or model.safetensors.index.json")


def config_from_hf(hf: dict, meta: dict | None = None) -> ModelConfig:
    """A ModelConfig from a Qwen2-MoE config.json dict (+ our "mobilemoe" metadata when present)."""
    if hf.get("model_type") != "qwen2_moe":
        raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'qwen2_moe' or 'glm4_moe'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (MobileMoE uses SiLU)")
    if hf.get("use_sliding_window", False):
        raise ValueError("config.json: use_sliding_window=true is not supported (MobileMoE uses full attention)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope_type={rope.get('rope_type', rope.get('type'))!r} is not supported "
                         "(MobileMoE uses plain RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    L, D, H = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    n_exp = int(hf.get("num_experts", 0) or 0)
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = sorted({i for i in range(L) if n_exp == 0 or i in (hf.get("mlp_only_layers") or []) or (i + 1) % step})
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) if n_exp else 0
    d = dict(
        vocab_size=hf["vocab_size"], d_model=D, n_layers=L, n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or D // H,
        rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        ffn_dim=int(hf.get("intermediate_size", 0)) if dense else 0,
        n_experts=n_exp if len(dense) < L else 0, top_k=int(hf.get("num_experts_per_tok", 0)) if len(dense) < L else 0,
        expert_ffn_dim=int(hf.get("moe_intermediate_size", 0)) if len(dense) < L else 0,
        n_shared_experts=1 if shared else 0, shared_ffn_dim=shared,
        dense_layers=tuple(dense) if len(dense) < L else (), router_score="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    if meta:
        m = ModelConfig.from_dict(meta).to_dict()
        m["dense_layers"] = tuple(m["dense_layers"])
        for f in _ARCH_FIELDS:
            if d["n_experts"] == 0 and f in ("top_k", "expert_ffn_dim", "norm_topk_prob", "dense_layers"):
                continue  # meaningless for a dense model
            if m[f] != d[f]:
                raise ValueError(f"config.json: '{META_KEY}.{f}'={m[f]!r} disagrees with the Qwen2-MoE fields ({d[f]!r})")
        if d["n_experts"] and m["n_shared_experts"] * m["shared_ffn_dim"] != shared:
            raise ValueError(f"config.json: '{META_KEY}' shared experts {m['n_shared_experts']}x{m['shared_ffn_dim']} "
                             f"disagree with shared_expert_intermediate_size={shared}")
        d = m  # metadata agrees on the architecture and adds the training-only fields
    return ModelConfig(**d)


def config_from_glm(hf: dict, meta: dict | None = None, bias_nonzero: bool = False) -> ModelConfig:
    """A ModelConfig from a Glm4-MoE config.json dict (+ our "mobilemoe" metadata when present).
    bias_nonzero: whether the checkpoint's e_score_correction_bias has a non-zero entry."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (MobileMoE uses SiLU)")
    for key, want, why in (("use_qk_norm", False, "MobileMoE has no q/k norm"),
                           ("attention_bias", False, "MobileMoE attention has no biases")):
        if bool(hf.get(key, want)) != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported ({why})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope_type={rope.get('rope_type', rope.get('type'))!r} is not supported "
                         "(MobileMoE uses plain RoPE)")
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial:g} is not supported (MobileMoE rotates the "
                         "whole head)")
    if float(hf.get("routed_scaling_factor", 1.0)) != 1.0:
        raise ValueError(f"config.json: routed_scaling_factor={hf['routed_scaling_factor']!r} is not supported "
                         "(MobileMoE's gates are not rescaled)")
    if int(hf.get("n_group", 1) or 1) != int(hf.get("topk_group", 1) or 1):  # every group kept = no grouping
        raise ValueError(f"config.json: group-limited routing (n_group={hf.get('n_group')}, "
                         f"topk_group={hf.get('topk_group')}) is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    L, D, H = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    n_dense = min(L, int(hf.get("first_k_dense_replace", 1) or 0))
    moe = n_dense < L
    Fe = int(hf.get("moe_intermediate_size", 0)) if moe else 0
    n_sh = int(hf.get("n_shared_experts", 0) or 0) if moe else 0
    d = dict(
        vocab_size=hf["vocab_size"], d_model=D, n_layers=L, n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or D // H,
        rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        ffn_dim=int(hf.get("intermediate_size", 0)) if n_dense else 0,
        n_experts=int(hf.get("n_routed_experts", hf.get("num_local_experts", 0))) if moe else 0,
        top_k=int(hf.get("num_experts_per_tok", 0)) if moe else 0, expert_ffn_dim=Fe,
        n_shared_experts=n_sh, shared_ffn_dim=Fe if n_sh else 0,
        dense_layers=tuple(range(n_dense)) if moe else (), router_score="sigmoid" if moe else "softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)), init_std=float(hf.get("initializer_range", 0.02)),
        router_bias_coeff=1e-3 if bias_nonzero else 0.0,
    )
    if meta:
        m = ModelConfig.from_dict(meta).to_dict()
        m["dense_layers"] = tuple(m["dense_layers"])
        for f in _ARCH_FIELDS:
            if d["n_experts"] == 0 and f in ("top_k", "expert_ffn_dim", "norm_topk_prob", "dense_layers",
                                             "router_score"):
                continue  # meaningless for a dense model
            if m[f] != d[f]:
                raise ValueError(f"config.json: '{META_KEY}.{f}'={m[f]!r} disagrees with the Glm4-MoE fields ({d[f]!r})")
        if d["n_experts"] and m["n_shared_experts"] * m["shared_ffn_dim"] != n_sh * Fe:
            raise ValueError(f"config.json: '{META_KEY}' shared experts {m['n_shared_experts']}x{m['shared_ffn_dim']} "
                             f"disagree with n_shared_experts={n_sh} x moe_intermediate_size={Fe}")
        if bias_nonzero and not m["router_bias_coeff"] > 0:
            raise ValueError(f"config.json: '{META_KEY}.router_bias_coeff' is 0 but e_score_correction_bias is "
                             "non-zero (our router would ignore it)")
        d = m  # metadata agrees on the architecture and adds the training-only fields
    return ModelConfig(**d)


def import_hf(hf_dir: str | os.PathLike, device: str | torch.device = "cpu") -> MobileMoE:
    """Read a Qwen2-MoE or Glm4-MoE checkpoint (ours or any with an expressible forward) into a MobileMoE in
    eval mode."""
    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json")
    try:
        hf = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / 'config.json'}: malformed ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{p / 'config.json'}: malformed (a JSON object expected)")
    glm = hf.get("model_type") == "glm4_moe"
    sd = _read_hf_state(p) if glm else None  # Glm4-MoE: the bias values decide router_bias_coeff
    try:
        if glm:
            bias_nonzero = any(bool(v.ne(0).any()) for k, v in sd.items() if k.endswith("e_score_correction_bias"))
            cfg = config_from_glm(hf, hf.get(META_KEY), bias_nonzero)
        else:
            cfg = config_from_hf(hf, hf.get(META_KEY))
    except KeyError as e:
        raise ValueError(f"{p / 'config.json'}: missing field {e}") from e
    if sd is None:
        sd = _read_hf_state(p)
    used: set[str] = set()
    if glm:  # MTP (next-token prediction) layers past the decoder stack: transformers' forward ignores them
        used.update(k for k in sd if k.startswith("model.layers.")
                    and int(k.split(".")[2]) >= cfg.n_layers)

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{p}: missing tensor {key}")
        used.add(key)
        x = sd[key]
        if tuple(x.shape) != shape:
            raise ValueError(f"{p}: tensor {key} has shape {tuple(x.shape)}, config implies {shape}")
        return x.float()

    D, hd, Fe, E = cfg.d_model, cfg.head_dim, cfg.expert_ffn_dim, cfg.n_experts
    Fs = cfg.n_shared_experts * cfg.shared_ffn_dim
    ours: dict[str, torch.Tensor] = {"tok_emb.weight": get("model.embed_tokens.weight", (cfg.vocab_size, D)),
                                     "norm.weight": get("model.norm.weight", (D,))}
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = get("lm_head.weight", (cfg.vocab_size, D))
    else:
        used.add("lm_head.weight")  # some writers store the tied copy; it is the embedding
    for i in range(cfg.n_layers):
        p_hf, p_us = f"model.layers.{i}.", f"layers.{i}."
        ours[p_us + "attn_norm.weight"] = get(p_hf + "input_layernorm.weight", (D,))
        ours[p_us + "ffn_norm.weight"] = get(p_hf + "post_attention_layernorm.weight", (D,))
        for us, th, rows in (("wq", "q", cfg.n_heads * hd), ("wk", "k", cfg.n_kv_heads * hd),
                             ("wv", "v", cfg.n_kv_heads * hd)):
            ours[p_us + f"attn.{us}.weight"] = get(p_hf + f"self_attn.{th}_proj.weight", (rows, D))
            bias_key = p_hf + f"self_attn.{th}_proj.bias"
            if bias_key in sd:
                if bool(get(bias_key, (rows,)).ne(0).any()):
                    raise ValueError(f"{p}: {bias_key} is non-zero; MobileMoE attention has no q/k/v biases")
        ours[p_us + "attn.wo.weight"] = get(p_hf + "self_attn.o_proj.weight", (D, cfg.n_heads * hd))
        if not cfg.layer_is_moe(i):
            ours[p_us + "ffn.w_gate_up.weight"] = torch.cat(
                [get(p_hf + "mlp.gate_proj.weight", (cfg.ffn_dim, D)), get(p_hf + "mlp.up_proj.weight", (cfg.ffn_dim, D))])
            ours[p_us + "ffn.w_down.weight"] = get(p_hf + "mlp.down_proj.weight", (D, cfg.ffn_dim))
            continue
        m = p_us + "moe."
        ours[m + "router.weight"] = get(p_hf + "mlp.gate.weight", (E, D))
        ours[m + "expert_bias"] = torch.zeros(E)
        if glm:
            bias_key = p_hf + "mlp.gate.e_score_correction_bias"
            if bias_key in sd:
                ours[m + "expert_bias"] = get(bias_key, (E,))
        if p_hf + "mlp.experts.gate_up_proj" in sd:  # fused in-memory layout
            ours[m + "w_gate_up"] = get(p_hf + "mlp.experts.gate_up_proj", (E, 2 * Fe, D))
            ours[m + "w_down"] = get(p_hf + "mlp.experts.down_proj", (E, D, Fe))
        else:
            ex = p_hf + "mlp.experts."
            ours[m + "w_gate_up"] = torch.stack([torch.cat([get(ex + f"{e}.gate_proj.weight", (Fe, D)),
                                                            get(ex + f"{e}.up_proj.weight", (Fe, D))]) for e in range(E)])
            ours[m + "w_down"] = torch.stack([get(ex + f"{e}.down_proj.weight", (D, Fe)) for e in range(E)])
        gate_key = p_hf + "mlp.shared_expert_gate.weight"
        if not glm and gate_key in sd and bool(get(gate_key, (1, D)).ne(0).any()):
            raise ValueError(f"{p}: {gate_key} is non-zero (a token-dependent shared-expert gate); MobileMoE's "
                             "shared experts are always on")
        sh = p_hf + ("mlp.shared_experts." if glm else "mlp.shared_expert.")
        if Fs:
            ours[m + "shared.w_gate_up.weight"] = torch.cat([get(sh + "gate_proj.weight", (Fs, D)),
                                                             get(sh + "up_proj.weight", (Fs, D))])
            # Qwen2-MoE: undo the x2 that cancels sigmoid(0) = 0.5 (exact: a power of two)
            ours[m + "shared.w_down.weight"] = get(sh + "down_proj.weight", (D, Fs)) / (1 if glm else 2)
        else:
            used.update(sh + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"{p}: unexpected tensors {unexpected[:3]} (not a {'Glm4-MoE' if glm else 'Qwen2-MoE'} "
                         "layout MobileMoE can express)")
    with torch.device("meta"):
        model = MobileMoE(cfg)
    model = model.to_empty(device=device)
    missing, extra = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.endswith("load_accum")]
    if missing or extra:  # a bug here, not bad input: every tensor was shape-checked above
        raise RuntimeError(f"import_hf: state mismatch (missing {missing[:3]}, unexpected {extra[:3]})")
    for mod in model.modules():
        if hasattr(mod, "load_accum"):
            mod.load_accum.zero_()
    return model.eval()


# ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from model.cli import run  # noqa: PLC0415

    return run(main_impl, argv)


def main_impl(argv: list[str]) -> int:
    from model.cli import choices, parser  # noqa: PLC0415

    ap = parser("python -m model.hf", "MobileMoE <-> Glm4-MoE / Qwen2-MoE (transformers). Exit status: 0 ok, 2 bad input "
                                      "(one line on stderr), 1 internal error.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar=choices(("export", "import")))
    force_help = "replace the output folder even when it is not empty and not a previous output of this command"
    e = sub.add_parser("export", help="model directory (model/io.py) -> Glm4-MoE (sigmoid router) or Qwen2-MoE checkpoint",
                       formatter_class=ap.formatter_class)
    e.add_argument("model_dir", help="MobileMoE model directory (model/io.py: config.json + model.safetensors)")
    e.add_argument("hf_dir", help="output folder for the transformers checkpoint (written atomically)")
    e.add_argument("--force", action="store_true", help=force_help)
    i = sub.add_parser("import", help="Qwen2-MoE / Glm4-MoE checkpoint -> model directory (model/io.py)",
                       formatter_class=ap.formatter_class)
    i.add_argument("hf_dir", help="Qwen2-MoE or Glm4-MoE checkpoint folder (config.json + safetensors)")
    i.add_argument("model_dir", help="output MobileMoE model directory (written atomically)")
    i.add_argument("--force", action="store_true", help=force_help)
    a = ap.parse_args(argv)
    from model.io import check_model_dir_target, load_model_dir, save_model_dir, tokenizer_path  # noqa: PLC0415

    # ValueError / OSError (bad or missing folders, unwritable targets) reach run(): one line, exit 2
    if a.cmd == "export":
        check_hf_target(a.hf_dir, a.force)  # before the (possibly slow) load
        model, meta = load_model_dir(a.model_dir)
        if meta.get("qat"):  # the INT4 phone format is mobile/'s job; transformers gets the latent weights
            print("note: QAT model: exporting its latent float weights (transformers runs them without the "
                  "INT4/int8 rounding)", file=sys.stderr)
            model.set_qat(False)
        out = export_hf(model, a.hf_dir, tokenizer_path(a.model_dir), force=a.force)
    else:
        check_model_dir_target(a.model_dir, a.force)
        model = import_hf(a.hf_dir)
        tok = Path(a.hf_dir) / "tokenizer.json"
        out = save_model_dir(model, a.model_dir, tok if tok.is_file() else None, force=a.force)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
