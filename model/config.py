"""ModelConfig, the size presets, and parameter / FLOP / memory accounting.

`python -m model.config --size S [--json] [--context 2048]` prints the accounting for a preset.

Counting convention (the one MobileLLM and the paper's dense anchors use): the tied input/output embedding
is counted once, in both total and active parameters. Active parameters per token = embedding + attention +
norms + router + shared experts + top_k routed experts (+ dense FFNs of dense layers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

GROUP = 32  # INT4 quant group along the input dimension (format: model/quant.py)


def int4_bytes(n_weights: int, group: int = GROUP) -> int:
    """Bytes of n weights in the INT4 format: n/2 nibble bytes + one fp16 scale per group."""
    return n_weights // 2 + 2 * (n_weights // group)


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 -> d_model // n_heads
    ffn_dim: int = 512  # dense SwiGLU hidden size (dense layers, dense models)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # MoE (n_experts == 0 -> a dense model)
    n_experts: int = 0
    top_k: int = 0
    expert_ffn_dim: int = 0  # fine-grained routed expert hidden size
    n_shared_experts: int = 0
    shared_ffn_dim: int = 0  # hidden size of each shared expert
    dense_layers: tuple[int, ...] = ()  # layer indices that use a dense FFN instead of MoE
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # renormalise the k selected gate values to sum to 1
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    router_bias_coeff: float = 0.0  # >0: auxiliary-loss-free balancing bias (selection only), update rate
    moe_backend: str = "auto"  # "auto" | "triton" | "reference" | "megablocks"
    # init
    init_std: float = 0.02
    seed: int = 0
    quant_group: int = GROUP

    def __post_init__(self) -> None:
        if isinstance(self.dense_layers, list):
            self.dense_layers = tuple(self.dense_layers)
        if self.head_dim == 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    # ---- validation: one ValueError naming the field ------------------------------------------------
    def validate(self) -> None:
        def bad(fld: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{fld}: {why}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, f) <= 0:
                bad(f, f"must be > 0, got {getattr(self, f)}")
        if self.d_model % self.n_heads != 0:
            bad("d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            bad("n_heads", f"{self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            bad("head_dim", f"must be a positive even number (RoPE), got {self.head_dim}")
        if self.router_score not in ("softmax", "sigmoid"):
            bad("router_score", f"must be 'softmax' or 'sigmoid', got {self.router_score!r}")
        if self.moe_backend not in ("auto", "triton", "reference", "megablocks"):
            bad("moe_backend", f"must be auto|triton|reference|megablocks, got {self.moe_backend!r}")
        if self.n_experts < 0:
            bad("n_experts", f"must be >= 0, got {self.n_experts}")
        if self.n_experts > 0:
            if self.top_k < 1:
                bad("top_k", f"must be >= 1 for an MoE model, got {self.top_k}")
            if self.top_k > self.n_experts:
                bad("top_k", f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
            if self.expert_ffn_dim <= 0:
                bad("expert_ffn_dim", f"must be > 0 for an MoE model, got {self.expert_ffn_dim}")
            if self.n_shared_experts > 0 and self.shared_ffn_dim <= 0:
                bad("shared_ffn_dim", "must be > 0 when n_shared_experts > 0")
        elif self.top_k != 0:
            bad("top_k", f"top_k={self.top_k} exceeds n_experts=0 (dense model)")
        for i in self.dense_layers:
            if not 0 <= i < self.n_layers:
                bad("dense_layers", f"layer {i} is outside 0..{self.n_layers - 1}")
        if (self.n_experts == 0 or self.dense_layers) and self.ffn_dim <= 0:
            bad("ffn_dim", "must be > 0 when any layer is dense")
        g = self.quant_group
        for f in ("d_model", "ffn_dim", "expert_ffn_dim", "shared_ffn_dim"):
            v = getattr(self, f)
            if v and v % g != 0:
                bad(f, f"{v} is not a multiple of the INT4 quant group {g}")
        if (self.n_heads * self.head_dim) % g != 0:
            bad("head_dim", f"n_heads*head_dim={self.n_heads * self.head_dim} is not a multiple of {g}")

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i not in self.dense_layers

    @property
    def n_moe_layers(self) -> int:
        return sum(self.layer_is_moe(i) for i in range(self.n_layers))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------------
# Presets. See README "Model sizes" for the reasoning; the accounting below reproduces the table.
# Vocabulary for S/M/L: SmolLM2's open BPE tokenizer (49152 entries, <|endoftext|> among them) plus the three
# chat tokens the recipes add (<|user|>, <|assistant|>, <|end|>: 49155), padded to a multiple of 64: 49216. A
# 202k vocabulary would spend a third of S's 0.3B active budget on the embedding.
# The MoE layer the paper publishes for S/M/L (shared by the three presets below).
_PAPER_MOE = dict(
    n_experts=60, top_k=4, n_shared_experts=1, router_score="sigmoid", norm_topk_prob=True,
    router_bias_coeff=1e-3, lb_loss_weight=0.0, z_loss_weight=1e-4, max_seq_len=8192, rope_theta=500000.0,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
        n_experts=16, top_k=2, expert_ffn_dim=64, n_shared_experts=1, shared_ffn_dim=128,
        max_seq_len=512, rope_theta=10000.0,
    ),
    # S/M/L: the paper's MoE layer (every layer): 60 fine-grained routed experts + 1 always-on shared expert of
    # the same width, top-4, sigmoid scores with the k selected gates renormalised, auxiliary-loss-free
    # balancing (selection-only bias, update rate 1e-3), router z-loss 1e-4, no load-balancing loss. Shapes
    # (not published) are ours: deep and thin, GQA, head_dim 64, expert width a multiple of 32 (INT4 g32);
    # see README "Model sizes". RoPE base 500k for the whole run: 2k pre-training, then 8k without a base change.
    # ffn_dim is only used by layers listed in dense_layers (none here).
    "S": dict(
        vocab_size=49216, d_model=1280, n_layers=30, n_heads=20, n_kv_heads=4, ffn_dim=3584,
        **_PAPER_MOE, expert_ffn_dim=160, shared_ffn_dim=160,
    ),
    "M": dict(
        vocab_size=49216, d_model=1792, n_layers=29, n_heads=28, n_kv_heads=7, ffn_dim=4864,
        **_PAPER_MOE, expert_ffn_dim=256, shared_ffn_dim=256,
    ),
    "L": dict(
        vocab_size=49216, d_model=2048, n_layers=40, n_heads=32, n_kv_heads=8, ffn_dim=5632,
        **_PAPER_MOE, expert_ffn_dim=320, shared_ffn_dim=320,
    ),
    # The earlier softmax designs, kept because bench/results/*.md measured them (under the names S/M/L), as they
    # were measured (vocab 49152: a run with SmolLM2's tokenizer needs vocab_size=49216 as an override):
    # fine-grained experts of width D/8, one shared expert of the same width, softmax router + LB loss,
    # E/k = 10.7-12, total/active 4.3-5.9.
    "S-softmax": dict(
        vocab_size=49152, d_model=1280, n_layers=28, n_heads=20, n_kv_heads=5, ffn_dim=3584,
        n_experts=64, top_k=6, expert_ffn_dim=160, n_shared_experts=1, shared_ffn_dim=160,
        max_seq_len=4096, rope_theta=500000.0,
    ),
    "M-softmax": dict(
        vocab_size=49152, d_model=1536, n_layers=30, n_heads=24, n_kv_heads=6, ffn_dim=4096,
        n_experts=96, top_k=8, expert_ffn_dim=192, n_shared_experts=1, shared_ffn_dim=192,
        max_seq_len=4096, rope_theta=500000.0,
    ),
    "L-softmax": dict(
        vocab_size=49152, d_model=2048, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=5632,
        n_experts=96, top_k=8, expert_ffn_dim=256, n_shared_experts=1, shared_ffn_dim=256,
        max_seq_len=4096, rope_theta=500000.0,
    ),
    # Dense baseline shaped like MobileLLM-Pro (FIELD_GUIDE): d 1280, FFN 6144, 30 layers, head_dim 64,
    # tied embeddings, vocab ~202k. (Its 3:1 local:global attention is not modelled: same weights/FLOPs.)
    "dense-1B": dict(
        vocab_size=202048, d_model=1280, n_layers=30, n_heads=20, n_kv_heads=4, head_dim=64, ffn_dim=6144,
        n_experts=0, top_k=0, max_seq_len=8192, rope_theta=500000.0,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return ModelConfig(name=name, **d)


# ------------------------------------------------------------------------------------------------------
# Accounting
def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind; must equal the MobileMoE module's tensors (tested)."""
    D, hd = cfg.d_model, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2  # wq, wo, wk, wv
    norms = 2 * D
    out = dict(embedding=cfg.vocab_size * D, lm_head=0 if cfg.tie_embeddings else cfg.vocab_size * D,
               attention=0, norms=D, router=0, shared=0, routed=0, routed_active=0, dense_ffn=0)
    for i in range(cfg.n_layers):
        out["attention"] += attn
        out["norms"] += norms
        if cfg.layer_is_moe(i):
            out["router"] += D * cfg.n_experts
            out["shared"] += 3 * D * cfg.shared_ffn_dim * cfg.n_shared_experts
            out["routed"] += 3 * D * cfg.expert_ffn_dim * cfg.n_experts
            out["routed_active"] += 3 * D * cfg.expert_ffn_dim * cfg.top_k
        else:
            out["dense_ffn"] += 3 * D * cfg.ffn_dim
    return out


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    b = param_breakdown(cfg)
    common = b["embedding"] + b["lm_head"] + b["attention"] + b["norms"] + b["router"] + b["shared"] + b["dense_ffn"]
    return common + b["routed"], common + b["routed_active"]


def flops_per_token(cfg: ModelConfig, context: int = 0) -> int:
    """Forward FLOPs for one token: 2 x every active matmul weight (the embedding lookup is free, the
    LM head is a V x D matmul), plus attention's sequence term 4 * n_layers * context * n_heads * head_dim
    (QK^T and AV for a token attending to `context` earlier positions; 0 leaves it out)."""
    b = param_breakdown(cfg)
    matmul = b["attention"] + b["router"] + b["shared"] + b["routed_active"] + b["dense_ffn"]
    matmul += cfg.vocab_size * cfg.d_model  # LM head (tied or not)
    return 2 * matmul + 4 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim


def int4_weight_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes in the phone format: INT4 g32 + fp16 scales for every matrix (embedding / LM head included),
    fp32 router and norms."""
    b = param_breakdown(cfg)
    q = sum(b[k] for k in ("embedding", "lm_head", "attention", "shared", "routed", "dense_ffn"))
    q_active = sum(b[k] for k in ("embedding", "lm_head", "attention", "shared", "routed_active", "dense_ffn"))
    f32 = 4 * (b["router"] + b["norms"])
    # bytes read per decoded token: one embedding row instead of the table, but the LM head reads all of it
    per_token = q_active - b["embedding"] - b["lm_head"] + cfg.vocab_size * cfg.d_model
    return dict(total=int4_bytes(q) + f32, active=int4_bytes(q_active) + f32,
                read_per_token=int4_bytes(per_token) + f32)


def kv_cache_bytes(cfg: ModelConfig, context: int, bytes_per_elem: int = 2) -> int:
    """fp16 K and V for every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * bytes_per_elem


def accounting(cfg: ModelConfig, context: int = 2048) -> dict:
    total, active = count_params(cfg)
    ib = int4_weight_bytes(cfg)
    return dict(
        name=cfg.name, total_params=total, active_params=active,
        flops_per_token=flops_per_token(cfg, 0), flops_per_token_at_context=flops_per_token(cfg, context),
        context=context, int4_bytes=ib["total"], int4_bytes_read_per_token=ib["read_per_token"],
        kv_cache_bytes_2k=kv_cache_bytes(cfg, 2048), kv_cache_bytes_8k=kv_cache_bytes(cfg, 8192),
        breakdown=param_breakdown(cfg),
    )


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    """The CLI; expected failures raise (model.cli.run prints them as one line, exit 2)."""
    from model import cli  # noqa: PLC0415  (the accounting above stays importable without the CLI helpers)

    p = cli.parser("python -m model.config", __doc__)
    p.add_argument("--size", type=cli.one_of(list(PRESETS)), default="S", metavar="PRESET",
                   help=f"preset: {cli.choices(list(PRESETS))}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--context", type=cli.nonneg_int, default=2048, metavar="N",
                   help="context (tokens, >= 0) for the attention FLOPs term")
    p.add_argument("--all", action="store_true", help="print a markdown table of every preset")
    a = p.parse_args(argv)
    if a.all:
        print(f"| preset | total | active | GFLOPs/token (ctx 0 / {a.context}) | INT4 MB | read/token MB | KV 2k MB | KV 8k MB |")
        print("|---|---|---|---|---|---|---|---|")
        for n in PRESETS:
            r = accounting(get_config(n), a.context)
            print(f"| {n} | {_fmt(r['total_params'])} | {_fmt(r['active_params'])} | "
                  f"{r['flops_per_token'] / 1e9:.3f} / {r['flops_per_token_at_context'] / 1e9:.3f} | "
                  f"{r['int4_bytes'] / 1e6:.1f} | {r['int4_bytes_read_per_token'] / 1e6:.1f} | "
                  f"{r['kv_cache_bytes_2k'] / 1e6:.1f} | {r['kv_cache_bytes_8k'] / 1e6:.1f} |")
        return 0
    r = accounting(get_config(a.size), a.context)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"preset {r['name']}")
    print(f"  total params          {r['total_params']:>15,}  ({_fmt(r['total_params'])})")
    print(f"  active params/token   {r['active_params']:>15,}  ({_fmt(r['active_params'])})")
    print(f"  fwd FLOPs/token       {r['flops_per_token']:>15,}  (no attention sequence term)")
    print(f"  fwd FLOPs/token @{a.context:<5} {r['flops_per_token_at_context']:>13,}  (+ QK^T, AV at that context)")
    print(f"  INT4 weight bytes     {r['int4_bytes']:>15,}  (g{GROUP} + fp16 scales, embedding INT4 too; router/norms fp32)")
    print(f"  bytes read/token      {r['int4_bytes_read_per_token']:>15,}  (decode: active experts + attention + LM head)")
    print(f"  KV cache @2k (fp16)   {r['kv_cache_bytes_2k']:>15,}")
    print(f"  KV cache @8k (fp16)   {r['kv_cache_bytes_8k']:>15,}")
    print("  breakdown: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["breakdown"].items()))
    return 0


if __name__ == "__main__":
    from model.cli import run

    raise SystemExit(run(main))
