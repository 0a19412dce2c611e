"""fp16 router weights (`python -m mobile export --router-dtype f16`, format version 2; mobile/FORMAT.md).

The engine's fp16 router logit is defined as the fp32 router's dot product (mobile/c/attention.c's canonical
8-lane order) over the exactly converted fp16 weights, so an f16-router file must give bit-identical logits to an
f32-router file holding those rounded weights (SIMD == scalar for the fp16 dot is tests/test_mobile_attention.py).
Against the fp32 router itself the routing differs wherever fp16 rounding moves a score across the top-k
boundary: the parity test measures that on a balanced random export with the S preset's router shapes (60
experts, top-4 sigmoid, d_model 1280; 4 layers and a 512 vocab to stay small). A trained model is not used: the
tests cannot read runs/, and training even the tiny preset for a few steps takes minutes on a loaded machine.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from mobile import format as fmt
from tests._mobile_util import BUILD, ROOT, build_engine

S_SHAPES = dict(n_layers=4, vocab_size=512)  # the S preset's router (E 60, top-4, D 1280), few layers
SEED = 5


@pytest.fixture(scope="module")
def s_pair(tmp_path_factory):
    """The same random S-shaped model with f32 and with f16 routers."""
    from mobile.export import export_random

    build_engine()
    d = tmp_path_factory.mktemp("router16")
    return (export_random("S", d / "f32.mmoe", seed=SEED, router_dtype="f32", **S_SHAPES),
            export_random("S", d / "f16.mmoe", seed=SEED, router_dtype="f16", **S_SHAPES))


def _tensors(path):
    buf = path.read_bytes()
    return buf, {e.name: e for e in fmt.read_table(buf)}


def test_f16_router_file_layout(s_pair):
    """Version 2 only with f16 routers; the routers are numpy's round-to-nearest-even fp16 of the fp32 ones and
    every other tensor holds the same bytes."""
    (b32, t32), (b16, t16) = _tensors(s_pair[0]), _tensors(s_pair[1])
    assert fmt.read_header(b32)["version"] == 1 and fmt.read_header(b16)["version"] == 2
    routers = [n for n in t32 if n.endswith(".moe.router")]
    assert len(routers) == S_SHAPES["n_layers"] and set(t32) == set(t16)
    for n, e in t32.items():
        raw32, raw16 = b32[e.offset:e.offset + e.size], b16[t16[n].offset:t16[n].offset + t16[n].size]
        if n in routers:
            assert e.dtype == fmt.DT_F32 and t16[n].dtype == fmt.DT_F16 and t16[n].shape == e.shape == (60, 1280)
            w = np.frombuffer(raw32, "<f4")
            assert np.frombuffer(raw16, "<f2").tobytes() == w.astype("<f2").tobytes()
            assert np.abs(w).max() > 0 and not np.array_equal(w.astype("<f2").astype("<f4"), w)  # rounding is real
        else:
            assert (e.dtype, e.shape, raw32) == (t16[n].dtype, t16[n].shape, raw16), n


def _eval_all(path, ids, threads):
    from mobile.engine import Engine

    with Engine(str(path), threads=threads) as eng:
        return eng.eval(ids, all_logits=True), eng.kernels


def test_f16_router_is_the_f32_dot_of_the_rounded_weights(s_pair, tmp_path):
    """Engine logits of the f16-router file == those of an f32-router file holding fp32(fp16(w)), bit for bit,
    on 1 and 2 threads: the fp16 path changes only the bytes read, not the arithmetic."""
    from mobile.export import random_tensors
    from model.config import get_config

    cfg = get_config("S", seed=SEED, **S_SHAPES).to_dict()
    specs = []
    for t in random_tensors(cfg, SEED, "balanced", "f16"):
        if t.name.endswith(".moe.router"):  # the same rounded values, stored as f32 (f16 -> f32 is exact)
            buf = io.BytesIO()
            t.write(buf)
            w16 = np.frombuffer(buf.getvalue(), "<f2").reshape(t.shape)
            t = fmt.router_tensor(t.name, w16.astype(np.float32), "f32")
        specs.append(t)
    rounded = fmt.write_mmoe(tmp_path / "rounded-f32.mmoe", cfg, specs, fmt.byte_tokenizer())
    assert fmt.read_header(rounded.read_bytes())["version"] == 1
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 256, 24)]
    for threads in (1, 2):
        got, kernels = _eval_all(s_pair[1], ids, threads)
        ref, _ = _eval_all(rounded, ids, threads)
        assert got.tobytes() == ref.tobytes(), (threads, kernels)
    f32, _ = _eval_all(s_pair[0], ids, 1)
    assert f32.tobytes() != got.tobytes()  # the rounding reaches the outputs, so the check above says something


def _routing(path, ids):
    """Per token (fed one at a time) and per MoE layer: the set of the top-k experts the engine selected."""
    from mobile.engine import Engine

    sets = []
    with Engine(str(path), threads=1) as eng:
        for t in ids:
            eng.expert_counts_reset()
            eng.eval([t])
            sets.append([frozenset(np.flatnonzero(c).tolist()) for c in eng.expert_counts()])
            assert all(len(s) == 4 for s in sets[-1])
    return sets


def _greedy(path, prompt, n):
    from mobile.engine import Engine

    with Engine(str(path), threads=1) as eng:
        return eng.generate(prompt, n, greedy=True).ids


def test_f16_routing_agrees_with_f32(s_pair):
    """Routing decisions of the f16 router against the fp32 router.

    Greedy decoding from a fixed prompt: tokens up to the first divergence, and over those positions (both
    engines saw the same tokens) the per-layer top-4 sets. Teacher-forced over the prompt + the f32 run's
    tokens: the fraction of identical (token, layer) top-4 sets. Bound: >= 97% identical sets. fp16 rounding
    moves each weight by <= 2^-11 relative, so a set changes only where the 4th and 5th scores lie within that
    perturbation of each other (and then the hidden states of later layers and tokens drift slightly); measured
    99.2% teacher-forced (2 of 256 sets, both in the last layer) and 56 of 56 greedy tokens identical. A wrong
    conversion, row stride or dtype dispatch gives near-random sets (~0% identical) and fails the bound."""
    f32, f16 = s_pair
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, 256, 8)]
    g32, g16 = _greedy(f32, prompt, 56), _greedy(f16, prompt, 56)
    first = next((i for i, (a, b) in enumerate(zip(g32, g16)) if a != b), len(g32))
    assert first >= 16, (first, g32, g16)  # the f16 router keeps greedy decoding on the f32 tokens this long
    ids = prompt + g32
    s32, s16 = _routing(f32, ids), _routing(f16, ids)
    same = np.array([[a == b for a, b in zip(x, y)] for x, y in zip(s32, s16)])  # (tokens, MoE layers)
    before = same[:len(prompt) + first].mean()
    print(f"router f16 vs f32: greedy tokens identical {first}/{len(g32)}, sets identical before the first "
          f"divergence {before:.4f}, teacher-forced {same.mean():.4f} (per layer {np.round(same.mean(0), 3)})")
    assert same.mean() >= 0.97, same.mean(0)
    assert before >= 0.97 and same.mean(0).min() >= 0.9, same.mean(0)


def test_cli_router_dtype(tmp_path):
    """`export --router-dtype f16` writes a version-2 file that info validates and lists with f16 routers; a bad
    value is a one-line usage error (exit 2)."""
    build_engine()
    out = tmp_path / "t16.mmoe"
    r = subprocess.run([sys.executable, "-m", "mobile", "export", "--random-init", "--size", "tiny", "--router-dtype",
                        "f16", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "mobile", "info", "--model", str(out)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "version              2" in r.stdout
    router_lines = [ln for ln in r.stdout.splitlines() if ".moe.router " in ln]
    assert router_lines and all(" f16 " in ln for ln in router_lines), r.stdout
    r = subprocess.run([str(BUILD / "mmoe-run"), str(out), "--prompt-ids", "1,2,3", "-n", "2", "--greedy", "--ids"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.strip().split(",")) == 2, r.stderr
    r = subprocess.run([sys.executable, "-m", "mobile", "export", "--random-init", "--router-dtype", "bf16", "--out",
                        str(tmp_path / "x.mmoe")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--router-dtype" in r.stderr and "f32 | f16" in r.stderr, r.stderr
    assert not (tmp_path / "x.mmoe").exists()


def test_f16_router_out_of_range_is_an_export_error():
    w = np.zeros((4, 32), np.float32)
    w[1, 3] = 7e4  # beyond fp16's 65504: would round to inf
    with pytest.raises(ValueError, match=r"layers\.2\.moe\.router: 1 router weights exceed the fp16 range"):
        fmt.router_tensor("layers.2.moe.router", w, "f16")
    w[1, 3] = 65504.0  # the largest fp16 is fine
    assert fmt.router_tensor("layers.2.moe.router", w, "f16").dtype == fmt.DT_F16
    with pytest.raises(ValueError, match="router dtype 'bf16'"):
        fmt.router_tensor("r", w, "bf16")


def test_torch_export_f16_router(tmp_path):
    """export_model_dir --router-dtype f16: the routers are fp16(the trained fp32 router), the rest unchanged."""
    import torch

    from mobile.export import export_model_dir
    from model.config import get_config
    from model.io import save_model_dir
    from model.model import MobileMoE

    torch.manual_seed(0)
    model = MobileMoE(get_config("tiny", n_layers=2, init_std=0.05)).set_qat(True)
    d = save_model_dir(model, tmp_path / "m")
    a = export_model_dir(d, tmp_path / "a.mmoe", router_dtype="f32")
    b = export_model_dir(d, tmp_path / "b.mmoe", router_dtype="f16")
    (ba, ta), (bb, tb) = _tensors(a), _tensors(b)
    for i in range(2):
        e = tb[f"layers.{i}.moe.router"]
        assert e.dtype == fmt.DT_F16 and ta[e.name].dtype == fmt.DT_F32
        want = model.layers[i].moe.router.weight.detach().numpy().astype("<f2")
        assert bb[e.offset:e.offset + e.size] == want.tobytes()
    e, f = ta["layers.1.attn.wq"], tb["layers.1.attn.wq"]
    assert ba[e.offset:e.offset + e.size] == bb[f.offset:f.offset + f.size]
