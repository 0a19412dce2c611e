"""The precision policy (model/precision.py): which dtypes reach the matmuls, the grouped-GEMM entry points and
the router in a real training step, under the CPU twin of the CUDA policy ("bf16") and with it disabled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels.moe as kmoe
import model.model as mm
from model.config import get_config
from model.model import MobileMoE, QLinear
from model.precision import BF16, FP32, policy_for
from train.batches import Batcher, LMSource
from train.loop import StageConfig, forward_loss, train_stage

BF, F32 = torch.bfloat16, torch.float32
V, T, B = 128, 16, 4


def _model(**ov):
    # layer 0 dense (SwiGLU), layer 1 MoE with a shared expert: every matmul kind the model has
    return MobileMoE(get_config("tiny", **{**dict(vocab_size=V, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                                  n_experts=4, top_k=2, expert_ffn_dim=32, shared_ffn_dim=32,
                                                  ffn_dim=64, max_seq_len=T, dense_layers=(0,)), **ov}))


def _batcher():
    return Batcher([LMSource(torch.arange(600) * 7 % V)], [1.0], T, B, seed=0)


class Probe:
    """Records the dtypes that reach the routed experts, the grouped GEMM, the router, SDPA and every QLinear
    in the forward, and the dtypes of the gradients flowing back through them."""

    def __init__(self, model, monkeypatch):
        self.seen: dict[str, set] = {}
        self.model = model
        orig_experts, orig_gemm, orig_sdpa = mm.moe_experts, kmoe._slices_gemm, F.scaled_dot_product_attention

        def experts(x, ids, gates, w13, w2, **kw):
            for n, t in (("experts.x", x), ("experts.gates", gates), ("experts.w13", w13), ("experts.w2", w2)):
                self._add(n, t)
            if gates.requires_grad:
                gates.register_hook(lambda g: self._add("grad.gates", g))
            return orig_experts(x, ids, gates, w13, w2, **kw)

        def gemm(x, w, bounds):
            self._add("gemm.x", x)
            self._add("gemm.w", w)
            y = orig_gemm(x, w, bounds)
            if y.requires_grad:
                y.register_hook(lambda g: self._add("grad.gemm.dy", g))
            return y

        def sdpa(q, k, v, **kw):
            for n, t in (("sdpa.q", q), ("sdpa.k", k), ("sdpa.v", v)):
                self._add(n, t)
            return orig_sdpa(q, k, v, **kw)

        monkeypatch.setattr(mm, "moe_experts", experts)
        monkeypatch.setattr(kmoe, "_slices_gemm", gemm)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        for name, mod in model.named_modules():
            if isinstance(mod, QLinear):  # F.linear needs equal operand dtypes: the output dtype is theirs
                mod.register_forward_hook(lambda m, i, o: self._add("qlinear.out", o))
            if name.endswith("router"):
                mod.register_forward_hook(self._router_hook)
        model.register_forward_hook(lambda m, i, o: self._add("lm_head.logits", o))
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: self._add("grad.param", p.grad))

    def _router_hook(self, mod, inp, out):
        self._add("router.weight", mod.weight)
        self._add("router.logits", out)
        out.register_hook(lambda g: self._add("grad.router.logits", g))

    def _add(self, name, t):
        self.seen.setdefault(name, set()).add(t.dtype)

    def violations(self, optim=None) -> list[str]:
        """What the CUDA policy forbids: anything but bf16 at a matmul operand, anything but fp32 on the router
        path, in the master weights, their grads or the optimizer state."""
        want = {"experts.x": BF, "experts.w13": BF, "experts.w2": BF, "gemm.x": BF, "gemm.w": BF,
                "grad.gemm.dy": BF, "sdpa.q": BF, "sdpa.k": BF, "sdpa.v": BF, "qlinear.out": BF,
                "lm_head.logits": BF, "experts.gates": F32, "grad.gates": F32, "router.weight": F32,
                "router.logits": F32, "grad.router.logits": F32, "grad.param": F32}
        bad = [f"{n}: {sorted(map(str, self.seen.get(n, set())))} (want {d})" for n, d in want.items()
               if self.seen.get(n) != {d}]
        bad += [f"param {n}: {p.dtype}" for n, p in self.model.named_parameters() if p.dtype != F32]
        if optim is not None:
            states = [v for s in optim.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
            assert states, "the optimizer holds no state: did the step run?"
            bad += [f"optimizer state {v.dtype}" for v in states if v.dtype != F32]
        return bad


def _train_one_step(monkeypatch, precision, autocast: bool = False):
    import train.loop as tl

    torch.manual_seed(0)
    model = _model()
    probe = Probe(model, monkeypatch)
    made = []
    orig_opt = tl.make_optimizer
    monkeypatch.setattr(tl, "make_optimizer", lambda m, c: made.append(orig_opt(m, c)) or made[-1])
    st = StageConfig(tokens=B * T, seq_len=T, global_batch=B, micro_batch=B // 2, lr=1e-3, warmup_frac=0.0)
    with torch.autocast("cpu", dtype=BF, enabled=autocast):
        res = train_stage(model, st, _batcher(), stage_dir=None, resume=None, progress=False, precision=precision)
    return probe, made[0], res


def test_cuda_policy_twin_reaches_grouped_gemm_in_bf16_router_and_masters_in_fp32(monkeypatch):
    probe, optim, res = _train_one_step(monkeypatch, BF16)
    assert probe.violations(optim) == []
    assert math.isfinite(res.train_loss)
    assert policy_for("cuda") is BF16 and policy_for("cpu") is FP32 and policy_for("cpu", "bf16") is BF16


def test_probe_catches_fp32_at_the_grouped_gemm(monkeypatch):
    # the policy disabled (fp32 everywhere): every matmul operand is flagged
    probe, optim, _ = _train_one_step(monkeypatch, FP32)
    bad = probe.violations(optim)
    for n in ("experts.x", "experts.w13", "experts.w2", "gemm.x", "gemm.w", "sdpa.q", "lm_head.logits"):
        assert any(b.startswith(n + ":") and "float32" in b for b in bad), (n, bad)
    # the old trainer's way (torch.autocast over fp32 modules): projections run in bf16 but the routed experts
    # still get fp32 x / w13 / w2 -- exactly the bug the policy fixes
    probe, optim, _ = _train_one_step(monkeypatch, FP32, autocast=True)
    bad_ac = probe.violations(optim)
    for n in ("experts.x", "experts.w13", "experts.w2", "gemm.x", "gemm.w"):
        assert any(b.startswith(n + ":") and "float32" in b for b in bad_ac), (n, bad_ac)
    assert not any(b.startswith("router.logits:") for b in bad_ac), bad_ac  # autocast no longer reaches the router


def test_bf16_loss_and_grads_close_to_fp32():
    ids = _batcher().get(0)[0]
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1)
    out = {}
    for pol in (FP32, BF16):
        # init_std 0.1 (not the default 0.02): the logits then carry structure (loss 0.3 nats above ln V), so a
        # bf16 path that flattened or corrupted them could not hide inside "about ln V"
        model = _model(init_std=0.1).set_precision(pol)
        s, n = forward_loss(model, ids, mask, "cpu")
        (s / n + model.aux_loss()).backward()
        out[pol.name] = (float(s.detach() / n), torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        assert all(p.grad.dtype == F32 for p in model.parameters())
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert math.isfinite(l16) and l16 != l32  # bf16 really ran: the same weights give a (slightly) other loss
    # Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3 per rounding); the loss is a mean
    # over B*T tokens whose independent roundings mostly cancel. Measured here: |dL| = 1.1e-4, i.e. 3.6e-4 of
    # the 0.30 nats the logits' structure adds to ln V. Bound: 1% of that structure (3e-3 nats), ~30x the
    # measurement yet 100x below what a broken path costs (uniform logits: 0.3 nats; NaN: not finite).
    structure = l32 - math.log(V)
    assert structure > 0.2, structure
    assert abs(l16 - l32) < 0.01 * structure, (l16, l32)
    cos = float(F.cosine_similarity(g16, g32, dim=0))
    assert cos > 0.999, cos  # measured 0.99995: the gradient direction survives bf16 compute


def test_fsdp_shard_keeps_router_fp32_and_blocks_bf16(tmp_path):
    """FSDP2 on a 1-rank gloo group under the bf16 policy: the router and norm gains are gathered in fp32,
    the blocks in bf16; the sharded masters and their reduced grads stay fp32."""
    import torch.distributed as dist

    from train.parallel import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model().set_precision(BF16)
        seen = {}
        router = model.layers[1].moe.router
        router.register_forward_hook(lambda m, i, o: seen.update(router_w=m.weight.dtype, logits=o.dtype))
        wq = model.layers[1].attn.wq
        wq.register_forward_hook(lambda m, i, o: seen.update(wq_w=m.weight.dtype, wq_out=o.dtype))
        model.layers[1].attn_norm.register_forward_hook(lambda m, i, o: seen.update(norm_w=m.weight.dtype))
        shard_model(model, BF16)
        ids = _batcher().get(0)[0]
        s, n = forward_loss(model, ids, torch.ones(ids.shape[0], ids.shape[1] - 1), "cpu")
        (s / n).backward()
        assert seen == dict(router_w=F32, logits=F32, wq_w=BF, wq_out=BF, norm_w=F32), seen
        for name, p in model.named_parameters():
            assert p.dtype == F32 and p.grad is not None and p.grad.dtype == F32, name
        assert math.isfinite(float(s.detach() / n))
    finally:
        dist.destroy_process_group()


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown precision policy 'fp8'"):
        policy_for("cpu", "fp8")
