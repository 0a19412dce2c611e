"""Exporter: a model directory (model/io.py) or a random init -> one .mmoe file (mobile/FORMAT.md).

Weights go through model/quant.py's quantize_int4 + pack_int4, so the file holds exactly the INT4 values
the QAT forward simulated. Random-init exports never build a torch model: weights are generated directly
in the quantized format with numpy and streamed to disk tensor by tensor (the 1B presets take seconds).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobile.format import (
    DT_F32,
    DT_Q4,
    DT_Q4_EXPERTS,
    TensorSpec,
    TokenizerBlob,
    align_up,
    byte_tokenizer,
    router_tensor,
    tokenizer_from_json,
    write_mmoe,
)


def _pad(f, n: int) -> None:
    if n:
        f.write(b"\0" * n)


def find_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a run directory holding one (final/ preferred, else the newest)."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such model or run directory")
    for name in ("final", "model", "qat", "stage4", "export"):
        if (p / name / "config.json").is_file():
            return p / name
    cands = [c.parent for c in p.glob("*/config.json")] + [c.parent for c in p.glob("*/*/config.json")]
    cands = [c for c in cands if (c / "model.safetensors").is_file()]
    if not cands:
        raise FileNotFoundError(f"{p}: no model directory (config.json + model.safetensors) inside")
    return max(cands, key=lambda c: (c / "model.safetensors").stat().st_mtime)


# ---- from a trained model ------------------------------------------------------------------------------
def _torch_tensors(model, router_dtype: str = "f32") -> list[TensorSpec]:
    import torch  # noqa: PLC0415  (the runtime side of mobile/ must not import torch)

    from model.quant import check_finite, pack_int4, quantize_int4  # noqa: PLC0415

    cfg = model.cfg

    def q4_block(w: torch.Tensor) -> bytes:
        q, s16 = quantize_int4(w.detach().float().cpu(), cfg.quant_group)
        return pack_int4(q, cfg.quant_group).numpy().tobytes() + s16.numpy().astype("<f2").tobytes()

    # every tensor is checked while the table is built, so a NaN / inf weight fails before any byte is written
    def q4(name, w):
        check_finite(name, w)

        def write(f, w=w):
            f.write(q4_block(w))
        return TensorSpec(name, DT_Q4, tuple(w.shape), write)

    def f32(name, t):
        check_finite(name, t)

        def write(f, t=t):
            f.write(t.detach().float().cpu().numpy().astype("<f4").tobytes())
        return TensorSpec(name, DT_F32, tuple(t.shape), write)

    out = [q4("tok_emb", model.tok_emb.weight)]
    if model.lm_head is not None:
        out.append(q4("lm_head", model.lm_head.weight))
    out.append(f32("norm", model.norm.weight))
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        out += [f32(p + "attn_norm", layer.attn_norm.weight), f32(p + "ffn_norm", layer.ffn_norm.weight)]
        for n in ("wq", "wk", "wv", "wo"):
            out.append(q4(p + "attn." + n, getattr(layer.attn, n).weight))
        if layer.is_moe:
            moe = layer.moe
            check_finite(p + "moe.router", moe.router.weight)
            out.append(router_tensor(p + "moe.router", moe.router.weight.detach().float().cpu().numpy(), router_dtype))
            # the bias only changes selection when the config enables it: export zeros otherwise
            bias = moe.expert_bias if cfg.router_bias_coeff > 0 else torch.zeros_like(moe.expert_bias)
            out.append(f32(p + "moe.expert_bias", bias))
            E, F, D = cfg.n_experts, cfg.expert_ffn_dim, cfg.d_model
            check_finite(p + "moe.experts (w_gate_up)", moe.w_gate_up)
            check_finite(p + "moe.experts (w_down)", moe.w_down)

            def write_experts(f, moe=moe, F=F, D=D):
                for e in range(moe.w_gate_up.shape[0]):
                    b = q4_block(moe.w_gate_up[e])
                    f.write(b)
                    _pad(f, align_up(len(b)) - len(b))
                    b = q4_block(moe.w_down[e])
                    f.write(b)
                    _pad(f, align_up(len(b)) - len(b))
            out.append(TensorSpec(p + "moe.experts", DT_Q4_EXPERTS, (E, F, D), write_experts))
            if moe.shared is not None:
                out += [q4(p + "moe.shared.w_gate_up", moe.shared.w_gate_up.weight),
                        q4(p + "moe.shared.w_down", moe.shared.w_down.weight)]
        else:
            out += [q4(p + "ffn.w_gate_up", layer.ffn.w_gate_up.weight), q4(p + "ffn.w_down", layer.ffn.w_down.weight)]
    return out


def export_model_dir(ckpt: str | os.PathLike, out: str | os.PathLike, tokenizer_json: str | None = None,
                     force: bool = False, router_dtype: str = "f32") -> Path:
    """router_dtype "f16" halves the router bytes a decode step reads (an fp16-rounded router: selections can
    differ from the fp32 router the model was trained with; FORMAT.md, version 2)."""
    from model.io import load_model_dir, tokenizer_path  # noqa: PLC0415  (imports torch)

    mdir = find_model_dir(ckpt)
    model, _meta = load_model_dir(mdir)
    cfg = model.cfg.to_dict()
    tj = tokenizer_json or tokenizer_path(mdir)
    tok = tokenizer_from_json(tj, cfg["vocab_size"]) if tj else byte_tokenizer()
    return write_mmoe(out, cfg, _torch_tensors(model, router_dtype), tok, force=force)


# ---- random init, straight into the quantized format ---------------------------------------------------
def random_tensors(cfg: dict, seed: int = 0, init: str = "balanced", router_dtype: str = "f32") -> list[TensorSpec]:
    """The .mmoe tensors of model/init.py's random INT4 weights (codes drawn directly, one tensor in memory at
    a time); mobile/gguf_export.py --random-init writes the same blocks as Q4_0."""
    from model.config import ModelConfig  # noqa: PLC0415  (plain Python, no torch)
    from model.init import param_plan, random_f32, random_q4  # noqa: PLC0415  (numpy only)

    plan = {p.name: p for p in param_plan(ModelConfig.from_dict(cfg), init)}

    def q4(name):
        p = plan[name + ".weight"]

        def write(f, p=p):
            q = random_q4(p, seed)
            f.write(q.nib)
            f.write(q.d.astype("<f2"))
        return TensorSpec(name, DT_Q4, p.shape, write)

    def f32(name):
        p = plan[name + ".weight"]
        return TensorSpec(name, DT_F32, p.shape, lambda f, p=p: f.write(random_f32(p, seed).astype("<f4")))

    out = [q4("tok_emb")]
    if not cfg["tie_embeddings"]:
        out.append(q4("lm_head"))
    out.append(f32("norm"))
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        out += [f32(p + "attn_norm"), f32(p + "ffn_norm")]
        out += [q4(p + "attn." + n) for n in ("wq", "wk", "wv", "wo")]
        if cfg["n_experts"] > 0 and i not in cfg["dense_layers"]:
            E = cfg["n_experts"]
            out += [router_tensor(p + "moe.router", random_f32(plan[p + "moe.router.weight"], seed), router_dtype),
                    TensorSpec(p + "moe.expert_bias", DT_F32, (E,), lambda f, E=E: f.write(np.zeros(E, "<f4")))]
            gu_p, dn_p = plan[p + "moe.w_gate_up"], plan[p + "moe.w_down"]

            def write_experts(f, gu_p=gu_p, dn_p=dn_p):
                gu, dn = random_q4(gu_p, seed), random_q4(dn_p, seed)
                for e in range(gu.nib.shape[0]):  # one record per expert: gate_up block, pad, down block, pad
                    for q in (gu, dn):
                        b = q.mmoe_bytes(e)
                        f.write(b)
                        _pad(f, align_up(len(b)) - len(b))
            out.append(TensorSpec(p + "moe.experts", DT_Q4_EXPERTS, (E, cfg["expert_ffn_dim"], cfg["d_model"]),
                                  write_experts))
            if cfg["n_shared_experts"] > 0:
                out += [q4(p + "moe.shared.w_gate_up"), q4(p + "moe.shared.w_down")]
        else:
            out += [q4(p + "ffn.w_gate_up"), q4(p + "ffn.w_down")]
    return out


def export_random(size: str, out: str | os.PathLike, seed: int = 0, tokenizer_json: str | None = None,
                  init: str = "balanced", force: bool = False, router_dtype: str = "f32", **overrides) -> Path:
    """A random-weight .mmoe of a preset: model/init.py's INT4 weights (`init` "balanced" routes like a trained,
    load-balanced model; "train" has MobileMoE.init_weights' stds)."""
    from model.config import get_config  # noqa: PLC0415  (config.py is plain Python, no torch)

    cfg = get_config(size, seed=seed, **overrides).to_dict()
    tok: TokenizerBlob = tokenizer_from_json(tokenizer_json, cfg["vocab_size"]) if tokenizer_json else byte_tokenizer()
    return write_mmoe(out, cfg, random_tensors(cfg, seed, init, router_dtype), tok, force=force)
