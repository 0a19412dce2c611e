"""MobileMoE: decoder-only transformer with fine-grained routed experts + always-on shared experts.

RMSNorm pre-norm, RoPE (rotate-half, as Llama/Qwen2), GQA attention through SDPA (flash-attn on CUDA when
installed and q/k/v are half precision), SwiGLU. An MoE FFN = fp32 router -> top-k over routed experts
(dropless) + shared experts, the routed part through `kernels.moe.moe_experts` (one dispatch point:
reference on CPU, Triton on CUDA).

QAT (`model.set_qat(True)`): every matrix weight goes through the INT4 g32 fake quant of model/quant.py
and every matmul input through the int8 per-token fake quant; K/V are rounded to fp16 as the phone
engine's KV cache stores them. Router and norms stay fp32.

Precision (`model.set_precision(policy)`, model/precision.py): every matmul casts its operands to the
policy's compute dtype (bf16 on CUDA training); residual stream, norms, RoPE arithmetic and the router stay
fp32. Without a policy set (inference, export, a freshly loaded model) nothing is cast: each matmul runs in
its input's dtype, as before.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.moe import moe_experts, resolve_backend
from kernels.router import load_balance_loss, route, z_loss
from model.config import ModelConfig
from model.init import param_plan
from model.precision import PrecisionPolicy
from model.quant import fake_quant_act_int8, fake_quant_int4

log = logging.getLogger("mobilemoe.model")
_attn_logged: set = set()

try:  # optional extra: only used on CUDA with half-precision inputs
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA install)
    flash_attn_func = flash_attn_varlen_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _to(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t in the compute dtype (None: no policy, keep t's dtype). The cast is differentiable: the gradient
    flows back to the fp32 master / activation in fp32."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class QLinear(nn.Linear):
    """nn.Linear (no bias) that fake-quantizes weight (INT4 g32) and input (int8/token) under QAT, then
    runs the matmul in the precision policy's compute dtype (the fake quant itself is fp32)."""

    qat = False
    compute_dtype: torch.dtype | None = None

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        cdt = self.compute_dtype
        if self.qat:
            return F.linear(_to(fake_quant_act_int8(x), cdt), _to(fake_quant_int4(self.weight), cdt))
        return F.linear(_to(x, cdt), _to(self.weight, cdt))


def rope_cos_sin(T: int, head_dim: int, theta: float, device, offset: int = 0):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    f = torch.outer(pos, inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def rope_cos_sin_at(pos_BT: torch.Tensor, head_dim: int, theta: float):
    """cos, sin (B, 1, T, head_dim) at per-token positions (broadcast over heads): rope_cos_sin's values at
    each token's own position."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_BT.device, dtype=torch.float32) / head_dim))
    f = pos_BT.float()[..., None] * inv
    emb = torch.cat([f, f], dim=-1)[:, None]
    return emb.cos(), emb.sin()


class DocMask:
    """Document masking of packed rows: token q attends to token k iff they are in the same document and
    k <= q, and RoPE positions restart at 0 at every document start (as document masking in OLMo /
    torchtitan), so a document's outputs are those of the document run alone.

    doc_BT: per-token document ids, equal within a document and each document contiguous in its row (any
    labels; train/batches.py's document_ids counts the EOS tokens before each one). The SDPA mask and the
    flash-attn cu_seqlens are built once per forward, on first use, and shared by every layer."""

    def __init__(self, doc_BT: torch.Tensor):
        if doc_BT.dim() != 2:
            raise ValueError(f"doc_ids must be (batch, seq), got shape {tuple(doc_BT.shape)}")
        self.doc_BT = doc_BT
        self._mask = self._cu = None

    def starts_BT(self) -> torch.Tensor:
        """True at the first token of every document (t = 0 of each row included)."""
        d = self.doc_BT
        first = torch.ones_like(d[:, :1], dtype=torch.bool)
        return torch.cat([first, d[:, 1:] != d[:, :-1]], dim=1)

    def positions(self) -> torch.Tensor:
        """(B, T) int64: each token's offset from its document's first token."""
        B, T = self.doc_BT.shape
        t = torch.arange(T, device=self.doc_BT.device).expand(B, T)
        start = torch.where(self.starts_BT(), t, torch.zeros_like(t)).cummax(dim=1).values
        return t - start

    def sdpa_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True = may attend: block-diagonal (one block per document) and causal."""
        if self._mask is None:
            d, T = self.doc_BT, self.doc_BT.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
            self._mask = ((d[:, :, None] == d[:, None, :]) & causal)[:, None]
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens (n_docs + 1,) int32, max_seqlen) over the B*T tokens flattened row after row: what
        flash_attn_varlen_func takes. A document never spans two rows (every row starts one)."""
        if self._cu is None:
            B, T = self.doc_BT.shape
            at = self.starts_BT().reshape(-1).nonzero().squeeze(1)
            end = torch.tensor([B * T], device=at.device, dtype=at.dtype)
            cu = torch.cat([at, end])
            self._cu = (cu.to(torch.int32), int((cu[1:] - cu[:-1]).max()))
        return self._cu


def apply_rope(x_BHTd, cos_Td, sin_Td):
    h = x_BHTd.shape[-1] // 2
    rot = torch.cat([-x_BHTd[..., h:], x_BHTd[..., :h]], dim=-1)
    return (x_BHTd.float() * cos_Td + rot.float() * sin_Td).to(x_BHTd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.wq = QLinear(D, H * hd)
        self.wk = QLinear(D, KV * hd)
        self.wv = QLinear(D, KV * hd)
        self.wo = QLinear(H * hd, D)
        self.qat = False

    def forward(self, x_BTD, cos, sin, dm: DocMask | None = None):
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qat:  # the phone engine keeps K/V in fp16
            k, v = k.half().to(q.dtype), v.half().to(q.dtype)
        # gate on q's dtype after the projections' policy cast (x itself stays fp32 in the residual stream)
        use_flash = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        key = (x_BTD.device.type, use_flash, dm is not None)
        if key not in _attn_logged:
            _attn_logged.add(key)
            log.info("attention: %s%s", "flash-attn" if use_flash else "torch SDPA",
                     "" if dm is None else (" varlen (document mask: cu_seqlens)" if use_flash else
                                            " with a block-diagonal causal mask (document mask)"))
        if use_flash and dm is not None:
            cu, mx = dm.varlen()
            o = flash_attn_varlen_func(*(t.transpose(1, 2).reshape(B * T, t.shape[1], -1) for t in (q, k, v)),
                                       cu, cu, mx, mx, causal=True)
            o = o.reshape(B, T, -1)
        elif use_flash:
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            o = o.reshape(B, T, -1)
        elif dm is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=dm.sdpa_mask(),
                                               enable_gqa=cfg.n_heads != cfg.n_kv_heads)
            o = o.transpose(1, 2).reshape(B, T, -1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_heads != cfg.n_kv_heads)
            o = o.transpose(1, 2).reshape(B, T, -1)
        return self.wo(o)


class SwiGLU(nn.Module):
    """gate and up fused in one matrix: rows [0, F) are gate, [F, 2F) are up."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate_up = QLinear(d_model, 2 * hidden)
        self.w_down = QLinear(hidden, d_model)

    def forward(self, x):
        g, u = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(g) * u)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fe = cfg.n_experts, cfg.d_model, cfg.expert_ffn_dim
        self.router = nn.Linear(D, E, bias=False)  # fp32, never quantized
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * Fe, D))  # (E, 2F, D): [gate; up] rows per expert
        self.w_down = nn.Parameter(torch.empty(E, D, Fe))  # (E, D, F)
        self.shared = SwiGLU(D, cfg.n_shared_experts * cfg.shared_ffn_dim) if cfg.n_shared_experts else None
        # selection-only bias for auxiliary-loss-free balancing (torchtitan/DeepSeek-V3 style)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("load_accum", torch.zeros(E), persistent=False)
        self.qat = False
        self.compute_dtype: torch.dtype | None = None
        self.ep_group = None  # set by MobileMoE.set_expert_parallel: w_gate_up / w_down become ep-sharded DTensors
        self.last = {}

    def forward(self, x_BTD):
        """Precision: the router runs in fp32 with autocast off (logits, softmax/sigmoid scores, top-k, gates,
        aux losses and their grads all fp32; the router weight is read in fp32). x, w13 and w2 enter
        kernels.moe.moe_experts in the policy's compute dtype (bf16 on CUDA), the kernels accumulate in fp32
        and round each GEMM output to bf16 once. The gates enter moe_experts in fp32 and are applied on the
        F side (W2 (g h) = g (W2 h)): each bf16 row of the down projection's input is multiplied by its fp32
        gate in fp32 and the product rounded to bf16 once (relative error <= 2^-9) before the down GEMM, in
        the CPU reference and the Triton path alike; the gate gradient (an F-wide dot per row) is reduced in
        fp32 and stays fp32."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        with torch.autocast(x_TD.device.type, enabled=False):
            # calling the module (not reading .weight) lets FSDP2 unshard it in its own fp32 group
            logits_TE = self.router(x_TD.float())
        bias = self.expert_bias if cfg.router_bias_coeff > 0 else None
        backend = resolve_backend(cfg.moe_backend, x_TD.device)
        ids_TK, gates_TK, scores_TE = route(logits_TE, cfg.top_k, cfg.router_score, cfg.norm_topk_prob, bias,
                                            backend="triton" if backend == "triton" else "reference")
        lb, counts_E = load_balance_loss(scores_TE, ids_TK, cfg.n_experts, cfg.router_score)
        self.last = dict(lb_loss=lb, z_loss=z_loss(logits_TE), counts=counts_E.detach(),
                         entropy=-(scores_TE * scores_TE.clamp_min(1e-20).log()).sum(-1).mean().detach()
                         if cfg.router_score == "softmax" else torch.zeros(()))
        if self.training:
            self.load_accum += counts_E.detach()
        w13, w2, act_fq, xin = self.w_gate_up, self.w_down, None, x_TD
        if self.ep_group is not None:  # DTensors of all E experts sharded over ep: this rank's E / P of them
            w13, w2 = w13.to_local(), w2.to_local()
        if self.qat:
            w13, w2, act_fq = fake_quant_int4(w13), fake_quant_int4(w2), fake_quant_act_int8
            xin = fake_quant_act_int8(x_TD)
        cdt = self.compute_dtype or x_TD.dtype  # no policy: the input's dtype, as before
        if self.ep_group is None:
            y_TD = moe_experts(_to(xin, cdt), ids_TK, gates_TK.float(), _to(w13, cdt), _to(w2, cdt),
                               backend=backend, act_fq=act_fq)
        else:  # tokens travel to the ranks owning their experts and back (model/expert_parallel.py)
            from model.expert_parallel import expert_parallel_experts  # noqa: PLC0415  (imports torch.distributed)

            y_TD = expert_parallel_experts(_to(xin, cdt), ids_TK, gates_TK.float(), _to(w13, cdt), _to(w2, cdt),
                                           self.ep_group, backend=backend, act_fq=act_fq)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(B, T, D)

    @torch.no_grad()
    def update_bias(self) -> None:
        """After an optimizer step: bias_e += coeff * sign(mean_load - load_e); then reset the load."""
        if self.cfg.router_bias_coeff > 0 and self.load_accum.sum() > 0:
            self.expert_bias += self.cfg.router_bias_coeff * torch.sign(self.load_accum.mean() - self.load_accum)
        self.load_accum.zero_()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.layer_is_moe(i)
        if self.is_moe:
            self.moe = MoE(cfg)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, dm: DocMask | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, dm)
        h = self.ffn_norm(x)
        return x + (self.moe(h) if self.is_moe else self.ffn(h))


class MobileMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else QLinear(cfg.d_model, cfg.vocab_size)
        self.qat = False
        self.precision: PrecisionPolicy | None = None
        self.aux = {}
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights(cfg.seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init with model/init.py's stds (init "train": N(0, init_std), residual projections wo /
        w_down N(0, init_std / sqrt(2L)), norms 1), drawn in named_parameters() order from one torch generator.
        Random-weight exports (mobile/) draw INT4 codes from the same table instead of building this model."""
        plan = {q.name: q for q in param_plan(self.cfg, "train")}
        names = [n for n, _ in self.named_parameters()]
        if sorted(names) != sorted(plan):
            raise RuntimeError(f"model/init.py's parameter plan disagrees with the module: "
                               f"{sorted(set(names) ^ set(plan))}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            q = plan[name]
            if q.kind == "ones":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * q.std)
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_bias.zero_()

    def set_qat(self, on: bool = True) -> MobileMoE:
        self.qat = on
        for m in self.modules():
            if hasattr(m, "qat") and m is not self:
                m.qat = on
        return self

    def set_precision(self, policy: PrecisionPolicy | None) -> MobileMoE:
        """Apply `policy` (model/precision.py) to every matmul; None: no casts (each matmul in its input's
        dtype). Parameters are not converted: they stay the fp32 master weights."""
        self.precision = policy
        cdt = None if policy is None else policy.compute_dtype
        for m in self.modules():
            if isinstance(m, (QLinear, MoE)):
                m.compute_dtype = cdt
        return self

    @torch.no_grad()
    def set_expert_parallel(self, ep) -> MobileMoE:
        """Shard the routed experts over `ep`, a 1-D DeviceMesh (e.g. mesh["ep"] of a dp_shard x ep mesh) or a
        ProcessGroup (model/expert_parallel.py): w_gate_up / w_down become DTensors of all E experts, Shard(0)
        over ep, each rank holding its E / P consecutive experts, and the forward exchanges tokens with
        all_to_all. Call on every rank of `ep`, before FSDP wrapping and before building the optimizer. The
        router, shared expert and everything else stay replicated (their gradients need averaging over ep:
        model/expert_parallel.py's allreduce_replicated_grads, or shard_model_ep). The state dict keeps the
        global (E, ...) shapes: a full state dict (torch.distributed.checkpoint.state_dict) gathers the experts."""
        from model.expert_parallel import as_ep_mesh, shard_experts  # noqa: PLC0415

        mesh = as_ep_mesh(ep, self.tok_emb.weight.device.type)
        for m in self.modules():
            if isinstance(m, MoE):
                if m.ep_group is not None:
                    raise RuntimeError("set_expert_parallel: the experts are already sharded")
                m.w_gate_up = nn.Parameter(shard_experts(m.w_gate_up, mesh))
                m.w_down = nn.Parameter(shard_experts(m.w_down, mesh))
                m.ep_group = mesh.get_group()
        return self

    def embed(self, ids_BT):
        w = fake_quant_int4(self.tok_emb.weight) if self.qat else self.tok_emb.weight
        return F.embedding(ids_BT, w)

    def head_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def head_operands(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's matmul operands (activations, weight (V, D)) exactly as the logits F.linear takes them:
        fake-quantised under QAT, cast to the policy's compute dtype. A fused linear + cross-entropy takes these
        so that it computes the same logits without materialising them (train/loop.py)."""
        w = self.head_weight()
        cdt = None if self.precision is None else self.precision.compute_dtype
        if self.qat:
            return _to(fake_quant_act_int8(h_BTD), cdt), _to(fake_quant_int4(w), cdt)
        return _to(h_BTD, cdt), _to(w, cdt)

    def forward(self, input_ids_BT: torch.Tensor, return_hidden: bool = False,
                doc_ids_BT: torch.Tensor | None = None):
        """Logits (B, T, V); return_hidden=True: the final normed hidden states (B, T, D) instead, with no
        logits computed (for a fused loss over head_operands). Either way self.aux holds the router terms.

        doc_ids_BT (B, T): document masking of packed rows (DocMask): each token attends only to earlier
        tokens of its own document and RoPE positions restart at 0 at each document, so every document's
        logits are those of the document run alone. None: plain causal attention over the whole row."""
        B, T = input_ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(input_ids_BT)
        if self.precision is not None:  # the residual stream stays in master precision (FSDP gathers bf16)
            x = x.to(self.precision.param_dtype)
        dm = None
        if doc_ids_BT is None:
            cos, sin = rope_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        else:
            if doc_ids_BT.shape != input_ids_BT.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids_BT.shape)} != input_ids shape {(B, T)}")
            dm = DocMask(doc_ids_BT.to(x.device))
            cos, sin = rope_cos_sin_at(dm.positions(), self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, dm)
        h = self.norm(x)
        self._collect_aux()
        if return_hidden:
            return h
        return F.linear(*self.head_operands(h))

    def _collect_aux(self):
        moes = [layer.moe for layer in self.layers if layer.is_moe]
        if not moes:
            z = torch.zeros((), device=self.tok_emb.weight.device)
            self.aux = dict(lb_loss=z, z_loss=z, expert_counts=None, router_entropy=z)
            return
        self.aux = dict(
            lb_loss=torch.stack([m.last["lb_loss"] for m in moes]).mean(),
            z_loss=torch.stack([m.last["z_loss"] for m in moes]).mean(),
            expert_counts=torch.stack([m.last["counts"] for m in moes]),  # (n_moe_layers, E)
            router_entropy=torch.stack([m.last["entropy"] for m in moes]).mean(),
        )

    def aux_loss(self) -> torch.Tensor:
        """Weighted auxiliary loss of the last forward: lb_w * LB + z_w * z (each averaged over MoE layers)."""
        return self.cfg.lb_loss_weight * self.aux["lb_loss"] + self.cfg.z_loss_weight * self.aux["z_loss"]

    def update_router_bias(self) -> None:
        for layer in self.layers:
            if layer.is_moe:
                layer.moe.update_bias()

    @torch.no_grad()
    def generate(self, ids_T: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_id: int | None = None) -> list[int]:
        """Plain recompute-everything sampling (the phone engine is the fast path)."""
        g = torch.Generator().manual_seed(seed)
        out = list(ids_T)
        dev = self.tok_emb.weight.device
        for _ in range(max_new_tokens):
            ctx = out[-self.cfg.max_seq_len:]
            logits = self(torch.tensor([ctx], device=dev))[0, -1].float().cpu()
            nxt = sample(logits, temperature, top_p, g)
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
        return out[len(ids_T):]


def sample(logits_V: torch.Tensor, temperature: float, top_p: float, g: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits_V))
    p = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
        p = p / p.sum()
    return int(torch.multinomial(p, 1, generator=g))
