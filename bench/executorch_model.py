"""The model ExecuTorch runs in bench.executorch_peer: our MobileMoE with the benchmark's random weights, re-expressed
for torch.export with a static KV cache (the shape of ExecuTorch's llama example). torch only (no executorch):
tests/test_executorch_peer.py checks it against MobileMoE.forward in the main venv.

    random_mobilemoe(size, seed)    MobileMoE(get_config(size)) holding exactly the weights of
                                    `mobile export --random-init --size SIZE --seed SEED` (model/init.py "balanced":
                                    the INT4 codes dequantized, code * d, exact in fp32)
    KVCacheLM(model, max_ctx)       forward(tokens_1T, input_pos_T) -> logits (1, V) of the last token, K/V written
                                    into fp32 cache buffers at input_pos (mutable buffers, as in the llama example)

Why not MobileMoE.forward itself: it has no KV cache (decode would be a full re-forward) and its routed experts are
data-dependent (dropless sort + gather, or the opaque custom op mobilemoe::moe_experts under export) which
ExecuTorch has no kernel for; bench/executorch_worker.py records where that export fails. KVCacheLM's MoE is the
dense-compute formulation instead: every token runs all E experts as two fused INT4-quantizable linears
(D -> E*2F and E*F -> D) and the non-selected experts get gate 0, so the routing is exactly the model's (sigmoid /
softmax scores, selection bias, top-k, renormalised gates) but the expert FLOPs and bytes are E/k times the sparse
engine's. A measured figure of this path is ExecuTorch's cost for the MoE *without* sparsity, said so in the report.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import get_config
from model.init import random_params
from model.model import MobileMoE, MoE


@torch.no_grad()
def random_mobilemoe(size: str, seed: int = 0) -> MobileMoE:
    """MobileMoE with the .mmoe random export's weights (same names, values exact: INT4 code * fp16 scale)."""
    cfg = get_config(size)
    with torch.device("meta"):
        m = MobileMoE(cfg)
    m = m.to_empty(device="cpu")
    params = dict(m.named_parameters())
    for p, v in random_params(cfg, seed=seed, init="balanced"):
        arr = v.dequantize() if p.kind == "matrix" else v
        params[p.name].copy_(torch.from_numpy(arr))
        del arr
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.expert_bias.zero_()
            mod.load_accum.zero_()
    return m.eval()


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
    return lin


class _Attention(nn.Module):
    def __init__(self, attn, cfg, max_ctx: int):
        super().__init__()
        self.H, self.KV, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = (_linear(getattr(attn, n).weight) for n in ("wq", "wk", "wv", "wo"))
        self.register_buffer("k_cache", torch.zeros(1, self.KV, max_ctx, self.hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, self.KV, max_ctx, self.hd), persistent=False)

    def forward(self, x_1TD, cos_Td, sin_Td, pos_T, mask_TC):
        T = x_1TD.shape[1]
        q = self.wq(x_1TD).view(1, T, self.H, self.hd).transpose(1, 2)
        k = self.wk(x_1TD).view(1, T, self.KV, self.hd).transpose(1, 2)
        v = self.wv(x_1TD).view(1, T, self.KV, self.hd).transpose(1, 2)
        q, k = _rope(q, cos_Td, sin_Td), _rope(k, cos_Td, sin_Td)
        self.k_cache[:, :, pos_T] = k
        self.v_cache[:, :, pos_T] = v
        rep = self.H // self.KV  # GQA by repeating K/V heads (enable_gqa is not in the lowered op set)
        kc, vc = self.k_cache.repeat_interleave(rep, dim=1), self.v_cache.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask_TC)
        return self.wo(o.transpose(1, 2).reshape(1, T, self.H * self.hd))


def _rope(x_1HTd, cos_Td, sin_Td):
    h = x_1HTd.shape[-1] // 2
    rot = torch.cat([-x_1HTd[..., h:], x_1HTd[..., :h]], dim=-1)
    return x_1HTd * cos_Td + rot * sin_Td


class _SwiGLU(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.w_gate_up, self.w_down = _linear(ffn.w_gate_up.weight), _linear(ffn.w_down.weight)

    def forward(self, x):
        g, u = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(g) * u)


class _DenseComputeMoE(nn.Module):
    """All E experts for every token; the routing (model/model.py MoE + kernels.router) only sets the gates."""

    def __init__(self, moe: MoE):
        super().__init__()
        cfg = moe.cfg
        self.E, self.Fe, self.k = cfg.n_experts, cfg.expert_ffn_dim, cfg.top_k
        self.score, self.norm_topk = cfg.router_score, cfg.norm_topk_prob
        self.router = _linear(moe.router.weight)  # stays fp32 (the quantizer's filter skips it)
        self.register_buffer("bias_E", moe.expert_bias.detach().clone() if cfg.router_bias_coeff > 0
                             else torch.zeros(self.E))
        E, Fe, D = self.E, self.Fe, cfg.d_model
        # (E, 2F, D) -> (E*2F, D): expert e's gate rows then its up rows; (E, D, F) -> (D, E*F): groups of 32 along
        # the input never straddle two experts (F is a multiple of 32)
        self.gate_up = _linear(moe.w_gate_up.reshape(E * 2 * Fe, D))
        self.down = _linear(moe.w_down.permute(1, 0, 2).reshape(D, E * Fe))
        self.shared = _SwiGLU(moe.shared) if moe.shared is not None else None

    def forward(self, x_TD):
        T = x_TD.shape[0]
        logits_TE = self.router(x_TD)
        scores_TE = torch.sigmoid(logits_TE) if self.score == "sigmoid" else torch.softmax(logits_TE, dim=-1)
        ids_TK = torch.topk(scores_TE + self.bias_E, self.k, dim=-1).indices
        gates_TK = torch.gather(scores_TE, 1, ids_TK)
        if self.norm_topk:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        w_TE = torch.zeros_like(scores_TE).scatter(1, ids_TK, gates_TK)
        gu = self.gate_up(x_TD).view(T, self.E, 2, self.Fe)
        h_TEF = F.silu(gu[:, :, 0]) * gu[:, :, 1] * w_TE.unsqueeze(-1)
        y_TD = self.down(h_TEF.reshape(T, self.E * self.Fe))
        return y_TD + self.shared(x_TD) if self.shared is not None else y_TD


class _Block(nn.Module):
    def __init__(self, blk, cfg, max_ctx: int):
        super().__init__()
        self.attn_norm, self.ffn_norm = blk.attn_norm, blk.ffn_norm
        self.attn = _Attention(blk.attn, cfg, max_ctx)
        self.ffn = _DenseComputeMoE(blk.moe) if blk.is_moe else _SwiGLU(blk.ffn)

    def forward(self, x_1TD, cos_Td, sin_Td, pos_T, mask_TC):
        x_1TD = x_1TD + self.attn(self.attn_norm(x_1TD), cos_Td, sin_Td, pos_T, mask_TC)
        return x_1TD + self.ffn(self.ffn_norm(x_1TD)[0]).unsqueeze(0)


class KVCacheLM(nn.Module):
    """Batch 1. forward(tokens (1, T) int64, input_pos (T,) int64 = start..start+T-1) -> logits (1, V) of the
    last token. The LM head is its own linear with the embedding's values (so the quantizer can make it INT4;
    the phone engine's single tied INT4 table is one copy, this is two)."""

    def __init__(self, m: MobileMoE, max_ctx: int):
        super().__init__()
        cfg = m.cfg
        if max_ctx > cfg.max_seq_len:
            raise ValueError(f"max_ctx {max_ctx} exceeds {cfg.name}'s max_seq_len {cfg.max_seq_len}")
        self.max_ctx = max_ctx
        self.tok_emb, self.norm = m.tok_emb, m.norm
        self.layers = nn.ModuleList(_Block(b, cfg, max_ctx) for b in m.layers)
        self.lm_head = _linear(m.head_weight())
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        f = torch.outer(torch.arange(max_ctx, dtype=torch.float32), inv)
        emb = torch.cat([f, f], dim=-1)
        self.register_buffer("cos_Cd", emb.cos(), persistent=False)
        self.register_buffer("sin_Cd", emb.sin(), persistent=False)
        self.register_buffer("mask_CC", torch.ones(max_ctx, max_ctx, dtype=torch.bool).tril(), persistent=False)

    def forward(self, tokens_1T: torch.Tensor, input_pos_T: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens_1T)
        cos, sin, mask = self.cos_Cd[input_pos_T], self.sin_Cd[input_pos_T], self.mask_CC[input_pos_T]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos_T, mask)
        return self.lm_head(self.norm(x[:, -1, :]))
