"""Export a MobileMoE model as a llama.cpp GGUF file (F32, F16 or Q4_0), written with the `gguf` package.

    python -m mobile export --format gguf --model runs/tiny/final --out tiny-f16.gguf --type f16
    python -m mobile export --format gguf --random-init --size S --out /tmp/mmoe-bench/S-q4_0.gguf --type q4_0
    python -m mobile.gguf_export ...   (same arguments)

Architecture choice. llama.cpp's `qwen2moe` graph does not compute our model: it never renormalises the
top-k gate values (norm_w is hard-coded false) and it multiplies the shared expert by sigmoid(w . x),
computed as silu(z)/z, so a zero gate vector (the obvious "always on" trick) yields 0/0 = NaN. The
`ernie4_5-moe` graph is exactly ours: softmax router in fp32, top-k with renormalised gates, an optional
selection-only bias added to the softmax probabilities (= our `expert_bias`), an ungated always-on shared
expert, SwiGLU experts, optional leading dense layers, RMSNorm, GQA, no attention biases, and a tied
LM head that falls back to the token embedding. Dense models go out as its dense sibling `ernie4_5`.
Both use llama.cpp's "NORM" RoPE (rotate adjacent pairs) where we rotate halves (NEOX), so the rows of
wq and wk are permuted within each head (the same permutation llama.cpp's HF converter applies for
Llama); q.k is unchanged because q and k get the same permutation, and v / wo are untouched.

Sigmoid-routed models (the paper presets S/M/L) go out as llama.cpp's `glm4moe` graph (src/models/glm4-moe.cpp):
fp32 router with sigmoid gating (expert_gating_func 2), selection on sigmoid + `exp_probs_b` (= our expert_bias;
the graph requires the tensor, so zeros are written when the bias is off), gates taken from the unbiased scores
and renormalised when `expert_weights_norm` (llama.cpp clamps the sum at 6.1e-5 where we clamp at 1e-20: equal
unless the k scores sum below 6e-5), `expert_weights_scale` 1.0 (a missing key reads 0 and zeroes the experts),
an ungated shared expert of `expert_shared_count` x the expert width (our shared width must be a whole number
of expert widths, at least one), leading dense layers (`leading_dense_block_count`), no MTP layer
(`nextn_predict_layers` 0), no q/k norm (the tensors are optional) and zero q/k/v biases (required by older
llama.cpp, optional in newer). Its RoPE is NEOX (rotate-half, as ours) over rope.dimension_count = head_dim, so
wq / wk are NOT permuted there; the post-attention norm is named `post_attention_norm`.

Q4_0 is bit-identical to our INT4 format (model/quant.py): a ggml block_q4_0 is one fp16 scale + 16 bytes
whose low nibbles hold elements 0..15 and high nibbles 16..31, value (nibble - 8) * d, which is exactly
pack_int4's layout and q * s. So the GGUF Q4_0 and the phone engine's .mmoe read the same weights and the
same number of weight bytes. Every matrix (token embedding / tied head included) is Q4_0 (llama.cpp's
"--pure"), router, norms and the selection bias stay F32.

`--random-init` writes model/init.py's random INT4 weights of a preset (the "balanced" init, which routes
like a trained, load-balanced model): as Q4_0 these are byte for byte the blocks of `python -m mobile export
--random-init` with the same size and seed (it writes that .mmoe beside --out and converts it with
--from-mmoe), so llama.cpp and our engine run identical weights; as F16/F32 their dequantized values.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mobile.format import _bytes_to_unicode  # one copy of GPT-2's byte map
from model.atomic import atomic_path, check_file_target
from model.config import PRESETS, ModelConfig, get_config
from model.quant import check_finite, pack_int4, quantize_int4

TYPES = ("f32", "f16", "q4_0")
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (1 is softmax)
Q4_0_BLOCK = 32
Q4_0_BLOCK_BYTES = 18  # fp16 d + 16 nibble bytes


def _gguf():
    try:
        import gguf  # noqa: PLC0415  (optional extra: only the GGUF path needs it)
    except ImportError as e:
        raise RuntimeError("the `gguf` package is not installed (pip install -c constraints-cpu.txt -e '.[bench]')") from e
    return gguf


# ---- weight conversions ------------------------------------------------------------------------------------
def q4_0_bytes(w: torch.Tensor) -> np.ndarray:
    """w (..., K) float -> uint8 (..., K/32*18): ggml block_q4_0 rows carrying our INT4 g32 quantization."""
    q, s16 = quantize_int4(w, Q4_0_BLOCK)
    packed = pack_int4(q, Q4_0_BLOCK)  # (..., K/2), 16 bytes per group in ggml's nibble order
    lead, K = tuple(w.shape[:-1]), w.shape[-1]
    nb = K // Q4_0_BLOCK
    qs = packed.reshape(*lead, nb, 16).numpy()
    d = s16.contiguous().numpy().astype("<f2").view(np.uint8).reshape(*lead, nb, 2)
    return np.ascontiguousarray(np.concatenate([d, qs], axis=-1).reshape(*lead, nb * Q4_0_BLOCK_BYTES))


def q4_0_bytes_chunked(w: torch.Tensor, rows: int = 1 << 14) -> np.ndarray:
    """Same as q4_0_bytes for a 2-D matrix, a row block at a time (a 202k x 1280 embedding would need
    several GB of temporaries in one go)."""
    if w.dim() != 2 or w.shape[0] <= rows:
        return q4_0_bytes(w)
    return np.concatenate([q4_0_bytes(w[i:i + rows]) for i in range(0, w.shape[0], rows)], axis=0)


def rope_neox_to_norm(w_RD: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the output rows of wq / wk per head from rotate-half (NEOX) to adjacent-pair (NORM) RoPE:
    new row 2i <- old row i, new row 2i+1 <- old row i + head_dim/2."""
    D = w_RD.shape[-1]
    return w_RD.reshape(n_heads, 2, head_dim // 2, D).transpose(1, 2).reshape(n_heads * head_dim, D)


# ---- tensor plan: (gguf name, producer of the fp32 tensor, kind) --------------------------------------------
# kind "matrix" is written in the requested type; "f32" always F32 (router, norms, bias)
def is_glm4moe(cfg: ModelConfig) -> bool:
    """Sigmoid-routed MoE models use llama.cpp's glm4moe graph; softmax MoE ernie4_5-moe, dense ernie4_5."""
    return cfg.is_moe and cfg.router_score == "sigmoid"


def _check_supported(cfg: ModelConfig) -> None:
    if is_glm4moe(cfg):
        if tuple(sorted(cfg.dense_layers)) != tuple(range(len(cfg.dense_layers))):
            raise ValueError(f"GGUF export: dense layers must lead the stack (got {cfg.dense_layers})")
        shared = cfg.n_shared_experts * cfg.shared_ffn_dim
        if shared == 0 or shared % cfg.expert_ffn_dim:
            raise ValueError(f"GGUF export: llama.cpp's glm4moe graph needs a shared expert whose width is a whole "
                             f"number of expert widths ({cfg.expert_ffn_dim}); got {cfg.n_shared_experts}x"
                             f"{cfg.shared_ffn_dim}")
    elif cfg.is_moe:
        if cfg.router_score != "softmax":
            raise ValueError("GGUF export: llama.cpp's ernie4_5-moe graph routes with softmax; "
                             f"router_score={cfg.router_score!r} is not expressible")
        if not cfg.norm_topk_prob:
            raise ValueError("GGUF export: ernie4_5-moe always renormalises the top-k gates; norm_topk_prob=False "
                             "is not expressible")
        if tuple(sorted(cfg.dense_layers)) != tuple(range(len(cfg.dense_layers))):
            raise ValueError(f"GGUF export: dense layers must lead the stack (got {cfg.dense_layers})")
        if cfg.n_shared_experts > 1:
            pass  # several shared experts are stored fused as one wider SwiGLU (our module does the same)
    if cfg.quant_group != Q4_0_BLOCK:
        raise ValueError(f"GGUF export: Q4_0 blocks are 32 wide, config has quant_group={cfg.quant_group}")


def _param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of MobileMoE(cfg)'s parameters in named_parameters() order, built on the meta device."""
    from model.model import MobileMoE  # noqa: PLC0415

    with torch.device("meta"):
        m = MobileMoE(cfg)
    return [(n, tuple(p.shape)) for n, p in m.named_parameters()]


def random_init_params(cfg: ModelConfig, seed: int, init: str = "balanced") -> Iterator[tuple[str, torch.Tensor]]:
    """model/init.py's random weights as fp32, one parameter at a time in MobileMoE parameter order: the INT4
    matrices dequantized (code * scale, exact), the router as drawn, norms 1 (expert_bias is 0: not written)."""
    from model.init import random_params  # noqa: PLC0415

    for p, v in random_params(cfg, seed, init):
        yield p.name, torch.from_numpy(v.dequantize() if p.kind == "matrix" else v)


def _gguf_tensors(cfg: ModelConfig, params: Iterator[tuple[str, torch.Tensor]],
                  buffers: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Map our parameters (streamed) onto GGUF tensors, in the order they arrive."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    glm = is_glm4moe(cfg)
    # glm4moe rotates halves like us (NEOX): no row permutation; ernie4_5 rotates adjacent pairs
    permute = (lambda w, n: w) if glm else (lambda w, n: rope_neox_to_norm(w, n, hd))
    ffn_norm = "post_attention_norm" if glm else "ffn_norm"
    for name, t in params:
        t = t.detach().float()
        if name == "tok_emb.weight":
            yield "token_embd.weight", t, "matrix"
            continue
        if name == "norm.weight":
            yield "output_norm.weight", t, "f32"
            continue
        if name == "lm_head.weight":
            yield "output.weight", t, "matrix"
            continue
        parts = name.split(".")
        if parts[0] != "layers":
            raise ValueError(f"GGUF export: unexpected parameter {name!r}")
        i, rest = int(parts[1]), ".".join(parts[2:])
        b = f"blk.{i}"
        if rest == "attn_norm.weight":
            yield f"{b}.attn_norm.weight", t, "f32"
        elif rest == "ffn_norm.weight":
            yield f"{b}.{ffn_norm}.weight", t, "f32"
        elif rest == "attn.wq.weight":
            yield f"{b}.attn_q.weight", permute(t, H), "matrix"
            if glm:
                yield f"{b}.attn_q.bias", torch.zeros(t.shape[0]), "f32"
        elif rest == "attn.wk.weight":
            yield f"{b}.attn_k.weight", permute(t, KV), "matrix"
            if glm:
                yield f"{b}.attn_k.bias", torch.zeros(t.shape[0]), "f32"
        elif rest == "attn.wv.weight":
            yield f"{b}.attn_v.weight", t, "matrix"
            if glm:
                yield f"{b}.attn_v.bias", torch.zeros(t.shape[0]), "f32"
        elif rest == "attn.wo.weight":
            yield f"{b}.attn_output.weight", t, "matrix"
        elif rest == "moe.router.weight":
            yield f"{b}.ffn_gate_inp.weight", t, "f32"
            bias = buffers.get(f"layers.{i}.moe.expert_bias")
            on = bias is not None and cfg.router_bias_coeff > 0
            if on and bool(bias.abs().sum() > 0):
                yield f"{b}.exp_probs_b.bias", bias.float(), "f32"
            elif glm:  # required by the glm4moe graph: an off bias is the zeros it acts as
                yield f"{b}.exp_probs_b.bias", torch.zeros(cfg.n_experts), "f32"
        elif rest == "moe.w_gate_up":  # (E, 2F, D): rows [0,F) gate, [F,2F) up
            Fe = cfg.expert_ffn_dim
            yield f"{b}.ffn_gate_exps.weight", t[:, :Fe].contiguous(), "matrix"
            yield f"{b}.ffn_up_exps.weight", t[:, Fe:].contiguous(), "matrix"
        elif rest == "moe.w_down":  # (E, D, F)
            yield f"{b}.ffn_down_exps.weight", t, "matrix"
        elif rest == "moe.shared.w_gate_up.weight":
            Fs = t.shape[0] // 2
            yield f"{b}.ffn_gate_shexp.weight", t[:Fs].contiguous(), "matrix"
            yield f"{b}.ffn_up_shexp.weight", t[Fs:].contiguous(), "matrix"
        elif rest == "moe.shared.w_down.weight":
            yield f"{b}.ffn_down_shexp.weight", t, "matrix"
        elif rest == "ffn.w_gate_up.weight":
            F_ = t.shape[0] // 2
            yield f"{b}.ffn_gate.weight", t[:F_].contiguous(), "matrix"
            yield f"{b}.ffn_up.weight", t[F_:].contiguous(), "matrix"
        elif rest == "ffn.w_down.weight":
            yield f"{b}.ffn_down.weight", t, "matrix"
        else:
            raise ValueError(f"GGUF export: unexpected parameter {name!r}")


def _storage(t: torch.Tensor, kind: str, qtype: str) -> str:
    if kind == "f32" or qtype == "f32" or t.dim() < 2:
        return "f32"
    if qtype == "q4_0" and t.shape[-1] % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 needs the last dimension to be a multiple of 32, got shape {tuple(t.shape)}")
    return qtype


def _info(t: torch.Tensor, kind: str, qtype: str) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(array shape, array dtype, bytes, raw ggml type) of the encoded tensor, from its shape alone (works
    on meta tensors, so the tensor table is written without computing any weights)."""
    st = _storage(t, kind, qtype)
    shape = tuple(t.shape)
    n = int(np.prod(shape))
    if st == "f32":
        return shape, np.dtype(np.float32), 4 * n, None
    if st == "f16":
        return shape, np.dtype(np.float16), 2 * n, None
    qshape = (*shape[:-1], shape[-1] // Q4_0_BLOCK * Q4_0_BLOCK_BYTES)
    return qshape, np.dtype(np.uint8), int(np.prod(qshape)), _gguf().GGMLQuantizationType.Q4_0


F16_MAX = 65504.0


def _encode(t: torch.Tensor, kind: str, qtype: str, gname: str = "?") -> np.ndarray:
    st = _storage(t, kind, qtype)
    if st == "f32":
        return np.ascontiguousarray(t.numpy().astype(np.float32))
    if st == "f16":
        a = t.numpy()
        # numpy turns |x| > 65504 into inf without a word: llama.cpp would then compute inf/NaN logits
        m = float(np.abs(a).max()) if a.size else 0.0
        if not m <= F16_MAX:
            raise ValueError(f"GGUF export: tensor {gname} has |w| = {m:.6g}, outside fp16's range (65504); "
                             f"export with --type f32 (or q4_0)")
        return np.ascontiguousarray(a.astype(np.float16))
    return q4_0_bytes_chunked(t)


# ---- tokenizer ------------------------------------------------------------------------------------------------
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def tokenizer_metadata(vocab_size: int, tokenizer_json: str | os.PathLike | None) -> dict:
    """GGUF tokenizer keys for a byte-level BPE ("gpt2" in llama.cpp). Without a tokenizer.json the model
    reads raw bytes: ids 0..255 are the bytes. Ids past the tokenizer's are padding, typed UNUSED."""
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    merges: list[str] = []
    pre = "gpt-2"
    eos = None
    if tokenizer_json is None:
        b2u = _bytes_to_unicode()
        for i in range(min(256, vocab_size)):
            tokens[i], types[i] = b2u[i], TOKEN_NORMAL
        # llama.cpp's BPE loader needs a merges array; a merge of two byte tokens whose result is not in the
        # vocabulary is never applied, so this one changes nothing
        merges = [f"{b2u[ord('a')]} {b2u[ord('b')]}"]
    else:
        try:
            tj = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # name the file, not just the JSON position
            raise ValueError(f"{tokenizer_json}: not a tokenizer.json ({e})") from None
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{tokenizer_json}: only byte-level BPE tokenizers export to GGUF, got {model.get('type')!r}")
        for s, i in model["vocab"].items():
            if i >= vocab_size:
                raise ValueError(f"{tokenizer_json}: token id {i} >= the model's vocab_size {vocab_size}")
            tokens[i], types[i] = s, TOKEN_NORMAL
        for t in tj.get("added_tokens") or []:
            if t["id"] >= vocab_size:
                raise ValueError(f"{tokenizer_json}: added token id {t['id']} >= vocab_size {vocab_size}")
            tokens[t["id"]] = t["content"]
            types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_NORMAL
            if t["content"] in ("<|endoftext|>", "</s>", "<eos>") and eos is None:
                eos = t["id"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if not merges:
            merges = ["\u0120 \u0120"]
        pretok = tj.get("pre_tokenizer") or {}
        pres = pretok.get("pretokenizers", [pretok]) if pretok.get("type") == "Sequence" else [pretok]
        if not any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pres):
            pre = "default"
    for i in range(vocab_size):
        if tokens[i] is None:
            tokens[i] = f"<|unused_{i}|>"
    return dict(tokens=tokens, types=types, merges=merges, pre=pre, eos=eos)


# ---- writer -----------------------------------------------------------------------------------------------
def arch_name(cfg: ModelConfig) -> str:
    if is_glm4moe(cfg):
        return "glm4moe"
    return "ernie4_5-moe" if cfg.is_moe else "ernie4_5"


def _writer_with_metadata(cfg: ModelConfig, qtype: str, tokenizer_json, name: str):
    """A GGUFWriter holding every key (architecture hyper-parameters, tokenizer); no tensors yet."""
    gguf = _gguf()
    if qtype not in TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; choose one of {TYPES}")
    _check_supported(cfg)
    arch = arch_name(cfg)
    w = gguf.GGUFWriter(None, arch)
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", {"f32": 0, "f16": 1, "q4_0": 2}[qtype])
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{arch}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", cfg.d_model)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.ffn_dim)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_theta))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.norm_eps))
    if is_glm4moe(cfg):
        w.add_uint32(f"{arch}.expert_count", cfg.n_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.top_k)
        w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.expert_ffn_dim)
        w.add_uint32(f"{arch}.expert_shared_count", cfg.n_shared_experts * cfg.shared_ffn_dim // cfg.expert_ffn_dim)
        w.add_uint32(f"{arch}.leading_dense_block_count", len(cfg.dense_layers))
        w.add_float32(f"{arch}.expert_weights_scale", 1.0)
        w.add_bool(f"{arch}.expert_weights_norm", bool(cfg.norm_topk_prob))
        w.add_uint32(f"{arch}.expert_gating_func", GATING_SIGMOID)
        w.add_uint32(f"{arch}.nextn_predict_layers", 0)
    elif cfg.is_moe:
        w.add_uint32(f"{arch}.expert_count", cfg.n_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.top_k)
        w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.expert_ffn_dim)
        w.add_uint32(f"{arch}.expert_shared_feed_forward_length", cfg.n_shared_experts * cfg.shared_ffn_dim)
        w.add_uint32(f"{arch}.interleave_moe_layer_step", 1)
        w.add_uint32(f"{arch}.leading_dense_block_count", len(cfg.dense_layers))
    tok = tokenizer_metadata(cfg.vocab_size, tokenizer_json)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", tok["pre"])
    w.add_array("tokenizer.ggml.tokens", tok["tokens"])
    w.add_array("tokenizer.ggml.token_type", tok["types"])
    w.add_array("tokenizer.ggml.merges", tok["merges"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    if tok["eos"] is not None:
        w.add_uint32("tokenizer.ggml.eos_token_id", tok["eos"])
    return w


GGUF_MAGIC = b"GGUF"


def check_gguf_target(out: str | os.PathLike, force: bool = False) -> None:
    """Raise TargetExistsError unless `out` may be (re)written: new, empty, a GGUF file, or force=True."""
    check_file_target(out, magic=GGUF_MAGIC, what="a GGUF file", force=force)


def _stream_out(w, out: Path, arrays: Iterator[np.ndarray], force: bool = False) -> Path:
    """Header, keys and tensor table (already added), then each array in table order, into a temp file in
    the destination folder that is fsynced and renamed into place (model/atomic.py: an existing `out` must
    be a GGUF file unless force=True)."""
    with atomic_path(out, magic=GGUF_MAGIC, what="a GGUF file", force=force) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for arr in arrays:
                w.write_tensor_data(np.ascontiguousarray(arr))
            w.flush()
        finally:
            w.close()  # closed before atomic_path fsyncs and renames it (or removes it on failure)
    return out


def write_gguf(cfg: ModelConfig, params: Callable[[], Iterator[tuple[str, torch.Tensor]]], out: str | os.PathLike,
               qtype: str = "f16", tokenizer_json: str | os.PathLike | None = None,
               buffers: dict[str, torch.Tensor] | None = None, name: str | None = None,
               force: bool = False) -> Path:
    """Write the GGUF atomically. `params()` streams (name, fp32 tensor) in MobileMoE parameter order (the
    order of the tensor table, which is built from the config's shapes)."""
    buffers = buffers or {}
    w = _writer_with_metadata(cfg, qtype, tokenizer_json, name or f"mobilemoe-{cfg.name}")
    # pass 1: the tensor table from shapes alone (meta tensors); pass 2 streams the data in the same order
    meta_params = [(n, torch.empty(s, device="meta")) for n, s in _param_shapes(cfg)]
    for gname, t, kind in _gguf_tensors(cfg, iter(meta_params), buffers):
        shape, dtype, nbytes, raw = _info(t, kind, qtype)
        w.add_tensor_info(gname, shape, dtype, nbytes, raw_dtype=raw)
    arrays = (_encode(t, kind, qtype, g) for g, t, kind in _gguf_tensors(cfg, params(), buffers))
    return _stream_out(w, Path(out), arrays, force)


def export_model_dir(model_dir: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16",
                     force: bool = False) -> Path:
    from mobile.export import find_model_dir  # noqa: PLC0415  (a run directory -> its model directory)
    from model.io import load_model_dir, tokenizer_path  # noqa: PLC0415

    model_dir = find_model_dir(model_dir)
    model, _meta = load_model_dir(model_dir)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    buffers = {n: b.detach() for n, b in model.named_buffers() if n.endswith("expert_bias")}
    for n, t in [*named, *buffers.items()]:  # before any byte is written
        check_finite(n, t)
    return write_gguf(model.cfg, lambda: iter(named), out, qtype, tokenizer_path(model_dir), buffers,
                      name=f"mobilemoe-{Path(model_dir).name}", force=force)


def export_random_init(cfg: ModelConfig, out: str | os.PathLike, qtype: str = "q4_0", seed: int = 0,
                       init: str = "balanced", force: bool = False) -> Path:
    """Q4_0: the .mmoe random export's blocks unchanged (written to a temp file beside `out`, converted, removed);
    F16/F32: the same weights dequantized."""
    name = f"mobilemoe-{cfg.name}-random-init"
    if qtype != "q4_0":
        return write_gguf(cfg, lambda: random_init_params(cfg, seed, init), out, qtype, None, name=name, force=force)
    import tempfile  # noqa: PLC0415

    from mobile.export import random_tensors  # noqa: PLC0415
    from mobile.format import byte_tokenizer, write_mmoe  # noqa: PLC0415

    _check_supported(cfg)
    check_gguf_target(out, force)  # before writing hundreds of MB
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.mmoe-", dir=Path(out).parent) as d:
        d_cfg = cfg.to_dict()
        mm = write_mmoe(Path(d) / "random.mmoe", d_cfg, random_tensors(d_cfg, seed, init), byte_tokenizer())
        return mmoe_to_gguf(mm, out, name=name, force=force)


# ---- from a .mmoe file: the phone engine's exact INT4 weights, re-laid out as Q4_0 (no requantization) ------
def _q4g32_to_q4_0(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A .mmoe q4g32 block (rows*cols/2 nibble bytes, then rows*cols/32 fp16 scales; mobile/FORMAT.md) ->
    (rows, cols/32*18) ggml block_q4_0 rows. Both use pack_int4's nibble order, so only the scales move."""
    nb = cols // Q4_0_BLOCK
    nib = buf[: rows * cols // 2].reshape(rows, nb, 16)
    sc = buf[rows * cols // 2: rows * cols // 2 + rows * nb * 2].reshape(rows, nb, 2)
    return np.concatenate([sc, nib], axis=-1).reshape(rows, nb * Q4_0_BLOCK_BYTES)


def _permute_rows(a_RX: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """rope_neox_to_norm on encoded rows (a row permutation commutes with any per-row encoding)."""
    X = a_RX.shape[-1]
    return a_RX.reshape(n_heads, 2, head_dim // 2, X).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, X)


def mmoe_to_gguf(mmoe_path: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                 force: bool = False) -> Path:
    """Convert a .mmoe file (mobile/export.py) into a GGUF Q4_0 holding bit-identical INT4 weights, so llama.cpp
    and our engine run exactly the same model. The tokenizer goes out as raw bytes (benchmarks feed ids)."""
    import mmap  # noqa: PLC0415

    from mobile.format import (  # noqa: PLC0415
        DT_F16,
        DT_F32,
        DT_Q4,
        DT_Q4_EXPERTS,
        align_up,
        q4_bytes,
        read_header,
        read_table,
    )

    gguf = _gguf()
    Q40 = gguf.GGMLQuantizationType.Q4_0
    with open(mmoe_path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        views = {"buf": np.frombuffer(mm, dtype=np.uint8)}
        h = read_header(mm)
        cj = bytes(mm[h["config_json_offset"]: h["config_json_offset"] + h["config_json_size"]])
        cfg = ModelConfig.from_dict(json.loads(cj))
        _check_supported(cfg)
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        glm = is_glm4moe(cfg)
        table = {e.name: e for e in read_table(mm)}

        def raw(e):
            return views["buf"][e.offset: e.offset + e.size]

        plan: list[tuple[str, tuple[int, ...], object, Callable[[], np.ndarray]]] = []

        def add_q4(gname, e, perm_heads=0):
            rows, cols = e.shape
            def make(e=e, rows=rows, cols=cols, perm_heads=perm_heads):
                a = _q4g32_to_q4_0(raw(e), rows, cols)
                return _permute_rows(a, perm_heads, hd) if perm_heads else a
            plan.append((gname, (rows, cols // 32 * 18), Q40, make))

        def add_f32(gname, e):
            plan.append((gname, tuple(e.shape), None, lambda e=e: raw(e).view("<f4").reshape(e.shape)))

        def add_zeros(gname, n):
            plan.append((gname, (n,), None, lambda n=n: np.zeros(n, dtype=np.float32)))

        def get(n, dtype):
            if n not in table:
                raise ValueError(f"{mmoe_path}: tensor {n!r} missing")
            if table[n].dtype != dtype:
                raise ValueError(f"{mmoe_path}: tensor {n!r} has dtype {table[n].dtype}, expected {dtype}")
            return table[n]

        add_q4("token_embd.weight", get("tok_emb", DT_Q4))
        if not cfg.tie_embeddings:
            add_q4("output.weight", get("lm_head", DT_Q4))
        add_f32("output_norm.weight", get("norm", DT_F32))
        for i in range(cfg.n_layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            add_f32(b + "attn_norm.weight", get(p + "attn_norm", DT_F32))
            add_f32(b + ("post_attention_norm.weight" if glm else "ffn_norm.weight"), get(p + "ffn_norm", DT_F32))
            add_q4(b + "attn_q.weight", get(p + "attn.wq", DT_Q4), 0 if glm else H)  # glm4moe: NEOX, no permutation
            if glm:
                add_zeros(b + "attn_q.bias", H * hd)
            add_q4(b + "attn_k.weight", get(p + "attn.wk", DT_Q4), 0 if glm else KV)
            if glm:
                add_zeros(b + "attn_k.bias", KV * hd)
            add_q4(b + "attn_v.weight", get(p + "attn.wv", DT_Q4))
            if glm:
                add_zeros(b + "attn_v.bias", KV * hd)
            add_q4(b + "attn_output.weight", get(p + "attn.wo", DT_Q4))
            if cfg.layer_is_moe(i):
                rt = table.get(p + "moe.router")
                if rt is not None and rt.dtype == DT_F16:  # an fp16 router (--router-dtype f16): f16 -> f32 is exact
                    plan.append((b + "ffn_gate_inp.weight", tuple(rt.shape), None,
                                 lambda e=rt: raw(e).view("<f2").astype(np.float32).reshape(e.shape)))
                else:
                    add_f32(b + "ffn_gate_inp.weight", get(p + "moe.router", DT_F32))
                if glm:  # the graph requires the bias; the .mmoe holds zeros when it is off
                    add_f32(b + "exp_probs_b.bias", get(p + "moe.expert_bias", DT_F32))
                elif p + "moe.expert_bias" in table and cfg.router_bias_coeff > 0:
                    eb = table[p + "moe.expert_bias"]
                    if np.any(raw(eb).view("<f4") != 0):
                        add_f32(b + "exp_probs_b.bias", eb)
                ex = get(p + "moe.experts", DT_Q4_EXPERTS)
                E, F_, D = ex.shape
                gu_b, dn_b = q4_bytes(2 * F_, D), q4_bytes(D, F_)
                rec = align_up(gu_b) + align_up(dn_b)

                def experts(part, ex=ex, E=E, F_=F_, D=D, gu_b=gu_b, dn_b=dn_b, rec=rec):
                    r = raw(ex).reshape(E, rec)
                    if part == "down":
                        return np.stack([_q4g32_to_q4_0(r[k, align_up(gu_b): align_up(gu_b) + dn_b], D, F_)
                                         for k in range(E)])
                    gu = np.stack([_q4g32_to_q4_0(r[k, :gu_b], 2 * F_, D) for k in range(E)])
                    return np.ascontiguousarray(gu[:, :F_] if part == "gate" else gu[:, F_:])
                plan.append((b + "ffn_gate_exps.weight", (E, F_, D // 32 * 18), Q40, lambda f=experts: f("gate")))
                plan.append((b + "ffn_up_exps.weight", (E, F_, D // 32 * 18), Q40, lambda f=experts: f("up")))
                plan.append((b + "ffn_down_exps.weight", (E, D, F_ // 32 * 18), Q40, lambda f=experts: f("down")))
                if cfg.n_shared_experts:
                    _split_gate_up(plan, b, "shexp", get(p + "moe.shared.w_gate_up", DT_Q4), raw, Q40)
                    add_q4(b + "ffn_down_shexp.weight", get(p + "moe.shared.w_down", DT_Q4))
            else:
                _split_gate_up(plan, b, "", get(p + "ffn.w_gate_up", DT_Q4), raw, Q40)
                add_q4(b + "ffn_down.weight", get(p + "ffn.w_down", DT_Q4))
        w = _writer_with_metadata(cfg, "q4_0", None, name or f"mobilemoe-{cfg.name}-from-mmoe")
        for gname, shape, rawt, _make in plan:
            dt = np.dtype(np.uint8) if rawt is not None else np.dtype(np.float32)
            w.add_tensor_info(gname, shape, dt, int(np.prod(shape)) * dt.itemsize, raw_dtype=rawt)
        return _stream_out(w, Path(out), (make() for _g, _s, _r, make in plan), force)
    finally:
        views.clear()
        try:
            mm.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with it at garbage collection
            pass


def _split_gate_up(plan, b, suffix, e, raw, Q40) -> None:
    rows, cols = e.shape
    half = rows // 2
    sfx = f"_{suffix}" if suffix else ""

    def part(which, e=e, rows=rows, cols=cols, half=half):
        a = _q4g32_to_q4_0(raw(e), rows, cols)
        return np.ascontiguousarray(a[:half] if which == "gate" else a[half:])
    plan.append((f"{b}ffn_gate{sfx}.weight", (half, cols // 32 * 18), Q40, lambda: part("gate")))
    plan.append((f"{b}ffn_up{sfx}.weight", (half, cols // 32 * 18), Q40, lambda: part("up")))


# ---- CLI ---------------------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m mobile.gguf_export") -> argparse.ArgumentParser:
    from model.cli import choices, nonneg_int, one_of, parser  # noqa: PLC0415

    p = parser(prog, "Export a MobileMoE model directory (or a random-init preset, or a .mmoe file) as a "
                     "llama.cpp GGUF file. Exit status: 0 ok, 2 bad input (one line on stderr), 1 internal error.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", "--ckpt", dest="model",
                     help="model directory (config.json + model.safetensors [+ tokenizer.json]) or a run directory")
    src.add_argument("--random-init", action="store_true", help="random weights of a preset (benchmarks)")
    src.add_argument("--from-mmoe", help="a .mmoe file: the engine's exact INT4 weights as Q4_0 (benchmarks)")
    presets = tuple(PRESETS)
    p.add_argument("--size", default="S", type=one_of(presets), metavar=choices(presets),
                   help="preset for --random-init")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed for --random-init")
    p.add_argument("--out", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--type", default="f16", type=one_of(TYPES), metavar=choices(TYPES),
                   help="matrix type (router/norms are always F32; --from-mmoe: q4_0 only)")
    p.add_argument("--force", action="store_true", help="overwrite --out even when it is not a GGUF file")
    return p


def _check_mmoe_source(path: str) -> None:
    """--from-mmoe: the C loader's validation when the engine is built (the rules every .mmoe reader applies);
    without it mmoe_to_gguf's own reads, whose struct errors main_impl turns into one line naming the file."""
    from mobile.engine import validate_file  # noqa: PLC0415  (torch-free ctypes binding)

    try:
        validate_file(path)
    except FileNotFoundError:  # libmmoe.so not built
        if not Path(path).is_file():
            raise FileNotFoundError(f"--from-mmoe {path}: no such file") from None


def main_impl(argv: list[str]) -> int:
    """The CLI without model/cli.py's run() wrapper (`python -m mobile export --format gguf` calls this inside
    its own run())."""
    import struct  # noqa: PLC0415

    a = build_parser().parse_args(argv)
    if a.from_mmoe and a.type != "q4_0":
        raise ValueError("--from-mmoe writes Q4_0 only (the .mmoe holds INT4 weights): use --type q4_0")
    check_gguf_target(a.out, a.force)  # before loading or generating anything
    if a.from_mmoe:
        _check_mmoe_source(a.from_mmoe)
        try:
            out = mmoe_to_gguf(a.from_mmoe, a.out, force=a.force)
        except struct.error as e:
            raise ValueError(f"{a.from_mmoe}: not a valid .mmoe file ({e})") from None
    elif a.random_init:
        out = export_random_init(get_config(a.size), a.out, a.type, a.seed, force=a.force)
    else:
        out = export_model_dir(a.model, a.out, a.type, force=a.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {a.type})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from model.cli import run  # noqa: PLC0415

    return run(main_impl, argv)


if __name__ == "__main__":
    raise SystemExit(main())
