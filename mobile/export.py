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
    q4_bytes,
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
def _torch_tensors(model) -> list[TensorSpec]:
    import torch  # noqa: PLC0415  (the runtime side of mobile/ must not import torch)

    from model.quant import pack_int4, quantize_int4  # noqa: PLC0415

    cfg = model.cfg

    def q4_block(w: torch.Tensor) -> bytes:
        q, s16 = quantize_int4(w.detach().float().cpu(), cfg.quant_group)
        return pack_int4(q, cfg.quant_group).numpy().tobytes() + s16.numpy().astype("<f2").tobytes()

    def q4(name, w):
        def write(f, w=w):
            f.write(q4_block(w))
        return TensorSpec(name, DT_Q4, tuple(w.shape), write)

    def f32(name, t):
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
            out.append(f32(p + "moe.router", moe.router.weight))
            # the bias only changes selection when the config enables it: export zeros otherwise
            bias = moe.expert_bias if cfg.router_bias_coeff > 0 else torch.zeros_like(moe.expert_bias)
            out.append(f32(p + "moe.expert_bias", bias))
            E, F, D = cfg.n_experts, cfg.expert_ffn_dim, cfg.d_model

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


def export_model_dir(ckpt: str | os.PathLike, out: str | os.PathLike, tokenizer_json: str | None = None) -> Path:
    from model.io import load_model_dir, tokenizer_path  # noqa: PLC0415  (imports torch)

    mdir = find_model_dir(ckpt)
    model, _meta = load_model_dir(mdir)
    cfg = model.cfg.to_dict()
    tj = tokenizer_json or tokenizer_path(mdir)
    tok = tokenizer_from_json(tj, cfg["vocab_size"]) if tj else byte_tokenizer()
    return write_mmoe(out, cfg, _torch_tensors(model), tok)


# ---- random init, straight into the quantized format ---------------------------------------------------
_Q_STD = float(np.sqrt((16 ** 2 - 1) / 12))  # std of q uniform on [-8, 7]
_CHUNK = 1 << 22  # bytes of nibbles generated per step


def _random_q4_writer(rows: int, cols: int, std: float, rng: np.random.Generator):
    """Uniform random nibbles (q uniform in [-8, 7]) with one scale s = std / std(q): weights of std `std`."""
    scale = np.float16(std / _Q_STD)

    def write(f):
        n = rows * cols // 2
        for start in range(0, n, _CHUNK):
            f.write(rng.integers(0, 256, size=min(_CHUNK, n - start), dtype=np.uint8).tobytes())
        ng = rows * cols // 32
        for start in range(0, ng, _CHUNK):
            f.write(np.full(min(_CHUNK, ng - start), scale, dtype="<f2").tobytes())
    return write


def random_tensors(cfg: dict, seed: int = 0) -> list[TensorSpec]:
    rng = np.random.default_rng(seed)
    D, V, H, KV, hd = cfg["d_model"], cfg["vocab_size"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    std = cfg["init_std"]
    res_std = std / np.sqrt(2 * cfg["n_layers"])

    def q4(name, rows, cols, s):
        return TensorSpec(name, DT_Q4, (rows, cols), _random_q4_writer(rows, cols, s, rng))

    def f32(name, shape, fill=None, s=0.0):
        def write(f):
            a = np.full(shape, fill, "<f4") if fill is not None else (rng.standard_normal(shape) * s).astype("<f4")
            f.write(a.tobytes())
        return TensorSpec(name, DT_F32, shape, write)

    out = [q4("tok_emb", V, D, std)]
    if not cfg["tie_embeddings"]:
        out.append(q4("lm_head", V, D, std))
    out.append(f32("norm", (D,), 1.0))
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        out += [f32(p + "attn_norm", (D,), 1.0), f32(p + "ffn_norm", (D,), 1.0),
                q4(p + "attn.wq", H * hd, D, std), q4(p + "attn.wk", KV * hd, D, std),
                q4(p + "attn.wv", KV * hd, D, std), q4(p + "attn.wo", D, H * hd, res_std)]
        if cfg["n_experts"] > 0 and i not in cfg["dense_layers"]:
            E, F = cfg["n_experts"], cfg["expert_ffn_dim"]
            out += [f32(p + "moe.router", (E, D), s=std), f32(p + "moe.expert_bias", (E,), 0.0)]
            gu, dn = _random_q4_writer(2 * F, D, std, rng), _random_q4_writer(D, F, res_std, rng)

            def write_experts(f, E=E, F=F, gu=gu, dn=dn):
                for _ in range(E):
                    gu(f)
                    _pad(f, align_up(q4_bytes(2 * F, D)) - q4_bytes(2 * F, D))
                    dn(f)
                    _pad(f, align_up(q4_bytes(D, F)) - q4_bytes(D, F))
            out.append(TensorSpec(p + "moe.experts", DT_Q4_EXPERTS, (E, F, D), write_experts))
            if cfg["n_shared_experts"] > 0:
                S = cfg["n_shared_experts"] * cfg["shared_ffn_dim"]
                out += [q4(p + "moe.shared.w_gate_up", 2 * S, D, std), q4(p + "moe.shared.w_down", D, S, res_std)]
        else:
            Fd = cfg["ffn_dim"]
            out += [q4(p + "ffn.w_gate_up", 2 * Fd, D, std), q4(p + "ffn.w_down", D, Fd, res_std)]
    return out


def export_random(size: str, out: str | os.PathLike, seed: int = 0, tokenizer_json: str | None = None,
                  **overrides) -> Path:
    from model.config import get_config  # noqa: PLC0415  (config.py is plain Python, no torch)

    cfg = get_config(size, seed=seed, **overrides).to_dict()
    tok: TokenizerBlob = tokenizer_from_json(tokenizer_json, cfg["vocab_size"]) if tokenizer_json else byte_tokenizer()
    return write_mmoe(out, cfg, random_tensors(cfg, seed), tok)
