"""One random init (model/init.py) for the torch model and both exporters, and random-weight exports that route
like a trained, load-balanced model (issue 12 item 7, issue 15 item 1).

- the parameter plan is MobileMoE's parameters (names, shapes, order) and init_weights' stds;
- random INT4 codes are zero-mean, deterministic per seed, and the random .mmoe and the random Q4_0 .gguf
  hold identical blocks;
- the C engine's routing counters count every (token, k) slot, prefill and decode, and reset;
- balanced routing: the random S export sends a 128-token prompt to >= 90% of the experts of every layer
  (the "train" stds reach ~20 of 64 at depth), and so does tiny.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.config import get_config
from model.init import Q_STD, param_plan, random_params, random_q4
from tests._mobile_util import build_engine

VARIANTS = [dict(), dict(dense_layers=(0,), tie_embeddings=False), dict(n_shared_experts=0, shared_ffn_dim=0),
            dict(n_experts=0, top_k=0, expert_ffn_dim=0, n_shared_experts=0, shared_ffn_dim=0)]


@pytest.fixture(scope="module")
def engine_built():
    build_engine()


@pytest.mark.parametrize("kw", VARIANTS, ids=["tiny", "dense0-untied", "no-shared", "dense"])
def test_param_plan_is_the_modules_parameters_and_init_stds(kw):
    import torch

    from model.model import MobileMoE

    cfg = get_config("tiny", **kw)
    with torch.device("meta"):
        m = MobileMoE(cfg)
    assert [(p.name, p.shape) for p in param_plan(cfg)] == [(n, tuple(p.shape)) for n, p in m.named_parameters()]
    m = MobileMoE(cfg)  # init_weights draws with the plan's stds
    plan = {p.name: p for p in param_plan(cfg)}
    res = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in m.named_parameters():
        want = plan[name]
        if want.kind == "ones":
            assert bool((p == 1).all()), name
            continue
        assert want.std == (res if name.endswith("wo.weight") or "w_down" in name else cfg.init_std), name
        if p.numel() >= 4096:
            assert abs(float(p.detach().std()) / want.std - 1) < 0.1, name


def test_random_codes_are_zero_mean_and_deterministic():
    cfg = get_config("tiny")
    a = list(random_params(cfg, seed=7))
    b = list(random_params(cfg, seed=7))
    c = list(random_params(cfg, seed=8))
    plan = {p.name: p for p in param_plan(cfg, "balanced")}
    for (pa, va), (_pb, vb), (_pc, vc) in zip(a, b, c):
        assert pa == plan[pa.name]
        if pa.kind != "matrix":
            assert np.array_equal(va, vb)
            if pa.kind == "f32":
                assert not np.array_equal(va, vc)
            continue
        assert np.array_equal(va.nib, vb.nib) and np.array_equal(va.d, vb.d), pa.name
        assert not np.array_equal(va.nib, vc.nib), pa.name
        w = va.dequantize()
        codes = np.rint(w / va.d.astype(np.float32).repeat(32, axis=-1)).astype(int)
        assert codes.min() >= -7 and codes.max() <= 7, pa.name  # never -8: symmetric
        assert abs(codes.mean()) < 0.05 * Q_STD, (pa.name, codes.mean())  # uniform nibbles would give -0.5
        assert abs(w.std() / pa.std - 1) < 0.05, (pa.name, w.std(), pa.std)
    # order-independent: one tensor alone equals the one drawn among all the others
    p0 = next(p for p in param_plan(cfg, "balanced") if p.name == "layers.2.attn.wk.weight")
    alone = random_q4(p0, 7)
    among = next(v for p, v in a if p.name == p0.name)
    assert np.array_equal(alone.nib, among.nib)


def test_balanced_init_keeps_scales_normal_fp16_for_every_preset():
    from model.config import PRESETS

    for size in PRESETS:
        for p in param_plan(get_config(size), "balanced"):
            if p.kind == "matrix":
                d = float(np.float16(p.std / Q_STD))
                assert 2.0**-14 <= d, (size, p.name, d)


def test_random_mmoe_and_q4_0_gguf_hold_identical_blocks(tmp_path):
    import gguf

    from mobile import format as fmt
    from mobile.export import export_random
    from mobile.gguf_export import _gguf_tensors, export_random_init, random_init_params

    cfg = get_config("tiny")
    mm = export_random("tiny", tmp_path / "t.mmoe", seed=5)
    gg = export_random_init(cfg, tmp_path / "t.gguf", "q4_0", seed=5)
    buf = mm.read_bytes()
    table = {e.name: e for e in fmt.read_table(buf)}
    params = {p.name: v for p, v in random_params(cfg, 5)}

    def raw(name):
        e = table[name]
        return buf[e.offset: e.offset + e.size]

    # the .mmoe holds model/init.py's blocks
    assert raw("tok_emb") == params["tok_emb.weight"].mmoe_bytes()
    assert raw("layers.1.attn.wq") == params["layers.1.attn.wq.weight"].mmoe_bytes()
    ex = raw("layers.3.moe.experts")
    rec = fmt.expert_record_bytes(cfg.expert_ffn_dim, cfg.d_model)
    gu, dn = params["layers.3.moe.w_gate_up"], params["layers.3.moe.w_down"]
    for e in (0, cfg.n_experts - 1):
        r = ex[e * rec:(e + 1) * rec]
        b = gu.mmoe_bytes(e)
        assert r[:len(b)] == b
        off = fmt.align_up(len(b))
        assert r[off:off + len(dn.mmoe_bytes(e))] == dn.mmoe_bytes(e)
    assert np.array_equal(np.frombuffer(raw("layers.0.moe.router"), "<f4").reshape(cfg.n_experts, cfg.d_model),
                          params["layers.0.moe.router.weight"])

    # the GGUF's Q4_0 blocks are those bytes: block = fp16 d, then the group's 16 nibble bytes
    reader = gguf.GGUFReader(str(gg))
    gt = {t.name: t for t in reader.tensors}
    emb = np.asarray(gt["token_embd.weight"].data).reshape(cfg.vocab_size, cfg.d_model // 32, 18)
    q = params["tok_emb.weight"]
    assert np.array_equal(emb[..., 2:], q.nib.reshape(cfg.vocab_size, -1, 16))
    assert np.array_equal(emb[..., :2].copy().view("<f2")[..., 0], q.d)
    down = np.asarray(gt["blk.3.ffn_down_exps.weight"].data).reshape(cfg.n_experts, cfg.d_model, -1, 18)
    assert np.array_equal(down[..., 2:], dn.nib.reshape(cfg.n_experts, cfg.d_model, -1, 16))
    # every tensor, through the name / permutation / gate-up split mapping the torch export uses
    want = {g: t.numpy() for g, t, _k in _gguf_tensors(cfg, random_init_params(cfg, 5), {})}
    assert set(want) == set(gt)
    for g, t in gt.items():
        got = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            got = gguf.quants.dequantize(got, t.tensor_type)
        assert np.array_equal(got.reshape(want[g].shape), want[g]), g


def test_random_init_f16_gguf_is_the_same_weights_dequantized(tmp_path):
    import gguf

    from mobile.gguf_export import _gguf_tensors, export_random_init, random_init_params

    cfg = get_config("tiny", n_layers=2)
    gg = export_random_init(cfg, tmp_path / "t16.gguf", "f16", seed=5)
    want = {g: t.numpy() for g, t, _k in _gguf_tensors(cfg, random_init_params(cfg, 5), {})}
    gt = {t.name: t for t in gguf.GGUFReader(str(gg)).tensors}
    assert set(gt) == set(want)
    for g, t in gt.items():
        w = want[g].astype(np.float16) if t.tensor_type == gguf.GGMLQuantizationType.F16 else want[g]
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), w), g


def _prompt(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_expert_counters_count_every_slot_and_reset(engine_built, tmp_path):
    from mobile.engine import Engine
    from mobile.export import export_random

    cfg = get_config("tiny", dense_layers=(1,))
    p = export_random("tiny", tmp_path / "t.mmoe", dense_layers=(1,))
    with Engine(p, threads=2) as eng:
        assert eng.moe_layers == [0, 2, 3]
        ids = _prompt(40, cfg.vocab_size)
        ref = eng.eval(ids, all_logits=True)
        c = eng.expert_counts()
        assert len(c) == 3 and all(x.shape == (cfg.n_experts,) for x in c)
        assert all(int(x.sum()) == 40 * cfg.top_k for x in c)
        eng.reset()  # keeps the counts; decode steps add to them
        for t in ids[:5]:
            eng.eval([t])
        assert all(int(x.sum()) == 45 * cfg.top_k for x in eng.expert_counts())
        eng.expert_counts_reset()
        assert all(int(x.sum()) == 0 for x in eng.expert_counts())
        eng.reset()
        assert np.array_equal(eng.eval(ids, all_logits=True), ref)  # counting changes no output bit
        g = eng.generate(ids[:16], 4, greedy=True, stop_at_eos=False)
        assert all(int(x.sum()) == (16 + g.decode_tokens) * cfg.top_k for x in g.expert_counts)


def _route(path, n, threads=1):
    from mobile.engine import Engine, routing_stats

    with Engine(path, threads=threads) as eng:
        eng.eval(_prompt(n, eng.vocab_size))
        return routing_stats(eng.expert_counts())


def _report(label, r):
    print(f"\n{label}: distinct experts per layer min {r['distinct_min']} / median {r['distinct_median']:g} of "
          f"{r['n_experts']}; max/mean load median {r['load_median']:.2f}, worst {r['load_worst']:.2f}")
    print("  per layer distinct:", r["distinct"])
    print("  per layer max/mean:", [round(x, 2) for x in r["load_max_mean"]])


def test_tiny_random_routing_is_balanced(engine_built, tmp_path):
    """tiny (16 experts, top-2): 128 tokens = 256 slots, 16 per expert; uniform random routing would give
    max/mean ~1.6. The balanced export stays near that at every layer; the train-init stds do not."""
    from mobile.export import export_random

    bal = _route(export_random("tiny", tmp_path / "b.mmoe"), 128)
    _report("tiny balanced", bal)
    assert all(d >= 0.9 * bal["n_experts"] for d in bal["distinct"]), bal["distinct"]
    assert bal["load_worst"] < 2.5, bal["load_max_mean"]
    train = _route(export_random("tiny", tmp_path / "t.mmoe", init="train"), 128)
    _report("tiny train-init stds", train)
    assert train["load_worst"] > bal["load_worst"]


def test_generate_profile_prints_routing(engine_built, tmp_path):
    import subprocess
    import sys

    from mobile.export import export_random
    from tests._mobile_util import ROOT

    p = export_random("tiny", tmp_path / "t.mmoe")
    ids = ",".join(map(str, _prompt(64, 2048)))
    r = subprocess.run([sys.executable, "-m", "mobile", "generate", "--model", str(p), "--prompt-ids", ids,
                        "--max-new-tokens", "4", "--greedy", "--profile"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("-- routing"))
    assert "(4 MoE layers, prefill + decode)" in line and "of 16" in line and "max/mean load" in line, line


def test_S_random_export_routes_to_most_experts_at_every_layer(engine_built, tmp_path):
    """The benchmark model: the S preset's random .mmoe (~740 MB, written and deleted here), a 128-token random
    prompt, one thread: every one of its MoE layers (30 layers of 60 experts today) sends it to >= 90% of its
    experts."""
    from mobile.export import export_random

    p = export_random("S", tmp_path / "S.mmoe")
    try:
        r = _route(p, 128)
    finally:
        p.unlink()
    _report("S balanced", r)
    cfg = get_config("S")
    assert r["layers"] == cfg.n_moe_layers and r["n_experts"] == cfg.n_experts
    assert all(d >= 0.9 * r["n_experts"] for d in r["distinct"]), r["distinct"]
    assert r["load_worst"] < 3.0, r["load_max_mean"]
