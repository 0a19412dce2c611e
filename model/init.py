"""The one random initialisation of a MobileMoE config: which parameters, their shapes and stds, and the
deterministic INT4 generator that the random-weight exports (mobile/export.py, mobile/gguf_export.py) share.
numpy only (imports model.config alone): the torch-free export path and the torch model read one table.

    param_plan(cfg)              -> [ParamInit(name, shape, std, kind)], MobileMoE.named_parameters() order
    param_plan(cfg, "balanced")  -> the benchmark init (below)
    random_params(cfg, seed)     -> (ParamInit, Q4Blocks | float32 array) per parameter (INT4 codes drawn
                                    directly)

init "train" (MobileMoE.init_weights, torch's generator): N(0, init_std), residual-branch outputs (attn.wo,
every w_down) N(0, init_std / sqrt(2 n_layers)), RMSNorm weights 1.

init "balanced" (the default of random-weight exports): weights that route like a trained, load-balanced
model, so a benchmark reads the expert bytes a real model reads. The "train" stds collapse routing at
depth: random q.k is tiny, so attention is near-uniform and every token's attention output is the average
of its prefix's values, a component all tokens share, while a token's own embedding (rms init_std) is
small next to the branch outputs; after a few layers every token's normalised state, and so its top-k, is
nearly the same (S, 128 random tokens: from layer 4 on 12-25 of 64 experts touched, max/mean load 10.7,
i.e. every token on the same 6 experts). The balanced init multiplies the residual-branch output stds by
RESIDUAL_SCALE and the token-embedding std by EMBED_GAIN (the branches / embedding ratio drops 32x): each
token's own embedding dominates the residual stream at every depth, and each layer's independent random
router sends it to its own experts (S: all 64 experts at all 28 layers, max/mean load median 1.83, worst
2.25; uniform random top-6 choices of 128 tokens give a median of 1.67). Half of the factor is on the
embedding because INT4 scales must stay normal fp16 (>= 2^-14, model/quant.py): wo / w_down of the 1B
presets cannot shrink 32x. With the stream dominated by the input token, a tied LM head would score that
token itself highest (e_t . e_t) and greedy decoding would repeat it forever, so the final RMSNorm weight
is random +-1 ("signs"): e_t . (w * e_t) is then a zero-mean sum like every other logit.

INT4 codes are zero-mean and symmetric: each nibble is a uniform random 4-bit value with nibble 0 (code -8)
replaced by 8 (code 0), so codes -7..7 have probability 1/16 each and 0 has 1/8 (std sqrt(17.5)). Uniform
nibbles (codes -8..7, mean -1/2) give every matrix an all-ones component that grows layer after layer and
sends all tokens to ~6 experts per layer. One fp16 scale d = std / sqrt(17.5) per tensor, in every group;
value = code * d, exactly model/quant.py's format and ggml's Q4_0 (value = (nibble - 8) * d). The fp32
router is N(0, init_std); expert_bias (a buffer) is 0.

Each tensor has its own generator, np.random.default_rng([seed, crc32(name)]): its values depend neither on
the order in which a writer asks for tensors nor on the config's other tensors.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from model.config import ModelConfig

INITS = ("train", "balanced")
# balanced init (module docstring; tests/test_balanced_routing.py measures the routing they give)
RESIDUAL_SCALE = 0.25  # multiplies the std of attn.wo and every w_down
EMBED_GAIN = 8.0  # multiplies the token embedding's std
GROUP = 32
S_MIN = 2.0**-14  # smallest normal fp16: model/quant.py's lower scale bound


@dataclass(frozen=True)
class ParamInit:
    name: str  # as in MobileMoE.named_parameters()
    shape: tuple[int, ...]
    std: float
    # "matrix" (INT4 in every export), "f32" (fp32 normal: the router), "ones" (RMSNorm weights),
    # "signs" (random +-1: the balanced init's final RMSNorm weight, see the module docstring)
    kind: str


def _is_residual_out(name: str) -> bool:
    return name.endswith("attn.wo.weight") or "w_down" in name


def param_plan(cfg: ModelConfig, init: str = "train") -> list[ParamInit]:
    """Every parameter of MobileMoE(cfg) in named_parameters() order (tests/test_balanced_routing.py checks)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    D, V, H, KV, hd, L = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    std = cfg.init_std
    res_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # the expression init_weights always used
    emb_std = std
    if init == "balanced":
        res_std, emb_std = res_std * RESIDUAL_SCALE, std * EMBED_GAIN

    out: list[ParamInit] = []

    def add(name, shape, s, kind="matrix"):
        if kind == "matrix" and _is_residual_out(name):
            s = res_std
        out.append(ParamInit(name, tuple(shape), float(s), kind))

    add("tok_emb.weight", (V, D), emb_std)
    for i in range(L):
        p = f"layers.{i}."
        add(p + "attn_norm.weight", (D,), 1.0, "ones")
        for n, rows in (("wq", H * hd), ("wk", KV * hd), ("wv", KV * hd)):
            add(p + f"attn.{n}.weight", (rows, D), std)
        add(p + "attn.wo.weight", (D, H * hd), std)
        add(p + "ffn_norm.weight", (D,), 1.0, "ones")
        if cfg.layer_is_moe(i):
            E, Fe = cfg.n_experts, cfg.expert_ffn_dim
            # MoE registers its own Parameters before its submodules (router, shared)
            add(p + "moe.w_gate_up", (E, 2 * Fe, D), std)
            add(p + "moe.w_down", (E, D, Fe), std)
            add(p + "moe.router.weight", (E, D), std, "f32")
            if cfg.n_shared_experts:
                S = cfg.n_shared_experts * cfg.shared_ffn_dim
                add(p + "moe.shared.w_gate_up.weight", (2 * S, D), std)
                add(p + "moe.shared.w_down.weight", (D, S), std)
        else:
            add(p + "ffn.w_gate_up.weight", (2 * cfg.ffn_dim, D), std)
            add(p + "ffn.w_down.weight", (D, cfg.ffn_dim), std)
    add("norm.weight", (D,), 1.0, "signs" if init == "balanced" else "ones")
    if not cfg.tie_embeddings:
        add("lm_head.weight", (V, D), std)
    return out


# ---- INT4 codes --------------------------------------------------------------------------------------------
Q_STD = math.sqrt(2 * sum(q * q for q in range(1, 8)) / 16)  # sqrt(17.5): std of the codes below
_NIB_BIT0 = np.uint64(0x1111111111111111)


def _symmetric_nibbles(words: np.ndarray) -> np.ndarray:
    """uint64 words of 16 uniform nibbles -> the same words with every nibble 0 (code -8) set to 8 (code 0)."""
    any_bit = words | (words >> np.uint64(1))
    any_bit |= words >> np.uint64(2)
    any_bit |= words >> np.uint64(3)  # bit 0 of each nibble: OR of that nibble's 4 bits
    return words | ((~any_bit & _NIB_BIT0) << np.uint64(3))


@dataclass
class Q4Blocks:
    """INT4 g32 weights of shape (..., rows, cols) in model/quant.py's pack_int4 layout: nib (..., rows, cols/2)
    uint8, per 32-wide group 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31, code =
    nibble - 8; d (..., rows, cols/32) fp16 scales. value = code * d. A .mmoe q4g32 block is nib's bytes
    then d's; a ggml block_q4_0 is one d then that group's 16 nib bytes."""

    nib: np.ndarray
    d: np.ndarray

    def mmoe_bytes(self, e: int | None = None) -> bytes:
        """The .mmoe q4g32 block of this 2-D matrix, or of expert e of an (E, rows, cols) tensor."""
        nib, d = (self.nib, self.d) if e is None else (self.nib[e], self.d[e])
        return nib.tobytes() + d.astype("<f2").tobytes()

    def dequantize(self) -> np.ndarray:
        """float32 (..., rows, cols): code * d (exact in fp32)."""
        lead = self.nib.shape[:-1]
        g = self.nib.reshape(*lead, -1, 16)
        codes = np.concatenate([g & 15, g >> 4], axis=-1).astype(np.float32) - 8.0  # (..., groups, 32)
        return (codes * self.d.astype(np.float32)[..., None]).reshape(*lead, -1)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def random_q4(p: ParamInit, seed: int) -> Q4Blocks:
    """The INT4 weights of a matrix parameter: zero-mean codes (module docstring), one scale std / Q_STD."""
    if p.kind != "matrix":
        raise ValueError(f"{p.name}: not a matrix parameter ({p.kind})")
    *lead, cols = p.shape
    if cols % GROUP:
        raise ValueError(f"{p.name}: last dimension {cols} is not a multiple of the INT4 group {GROUP}")
    d = np.float16(p.std / Q_STD)
    if not S_MIN <= float(d) <= 65504.0:
        raise ValueError(f"{p.name}: std {p.std:g} gives the INT4 scale {float(d):g}, outside the normal fp16 "
                         f"range [2^-14, 65504] (model/quant.py); choose another init_std")
    n_words = int(np.prod(p.shape)) // 16  # cols is a multiple of 32: whole 64-bit words
    words = _symmetric_nibbles(_rng(seed, p.name).bit_generator.random_raw(n_words).astype("<u8", copy=False))
    nib = words.view(np.uint8).reshape(*lead, cols // 2)
    return Q4Blocks(nib, np.full((*lead, cols // GROUP), d, dtype=np.float16))


def random_f32(p: ParamInit, seed: int) -> np.ndarray:
    if p.kind == "ones":
        return np.ones(p.shape, dtype=np.float32)
    if p.kind == "signs":
        return np.where(_rng(seed, p.name).random(p.shape) < 0.5, -1.0, 1.0).astype(np.float32)
    return _rng(seed, p.name).standard_normal(p.shape, dtype=np.float32) * np.float32(p.std)


def random_params(cfg: ModelConfig, seed: int = 0,
                  init: str = "balanced") -> Iterator[tuple[ParamInit, object]]:
    """(ParamInit, Q4Blocks for a matrix | float32 array) for every parameter, in param_plan order, lazily
    (one tensor in memory at a time)."""
    for p in param_plan(cfg, init):
        yield p, (random_q4(p, seed) if p.kind == "matrix" else random_f32(p, seed))
