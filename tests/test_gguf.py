"""GGUF export (mobile/gguf_export.py).

The first tests need only torch: the Q4_0 byte layout against ggml's block_q4_0 decode rule, the RoPE row
permutation, and the exporter's refusals. The parity tests run llama.cpp (llama-cpp-python, the `bench`
extra) on exported tiny models and compare its logits with our float PyTorch model; they are the allow-listed
optional tests of tests/conftest.py: they skip where llama-cpp-python is not installed (`make bench-mobile` installs
it). tests/test_gguf_convert.py checks the converted bytes themselves without llama.cpp, in CI.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math

import numpy as np
import pytest
import torch

from mobile.gguf_export import (
    _check_supported,
    q4_0_bytes,
    q4_0_bytes_chunked,
    rope_neox_to_norm,
    tokenizer_metadata,
)
from model.config import get_config
from model.quant import dequantize_int4, quantize_int4


def _ggml_dequant_q4_0(raw: np.ndarray, K: int) -> np.ndarray:
    """ggml's dequantize_row_q4_0, written from its definition: per 18-byte block, d = fp16 at bytes 0-1,
    y[j] = ((qs[j] & 0xF) - 8) * d and y[j + 16] = ((qs[j] >> 4) - 8) * d for j in 0..15."""
    rows = raw.reshape(-1, K // 32, 18)
    d = rows[..., :2].copy().view("<f2").astype(np.float32)  # (R, nb, 1)
    qs = rows[..., 2:].astype(np.int32)
    lo, hi = (qs & 0xF) - 8, (qs >> 4) - 8
    return (np.concatenate([lo, hi], axis=-1) * d).reshape(-1, K)


def test_q4_0_blocks_decode_to_our_int4_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 96, generator=g) * 0.05
    w[2, 32:64] = 0.0  # an all-zero group (scale 2^-14, q 0)
    w[3, 5] = 1.0  # an outlier group
    raw = q4_0_bytes(w)
    assert raw.dtype == np.uint8 and raw.shape == (7, 96 // 32 * 18)
    q, s = quantize_int4(w)
    ref = dequantize_int4(q, s).numpy()
    np.testing.assert_array_equal(_ggml_dequant_q4_0(raw, 96), ref)
    # the row-chunked path (used for big embeddings) gives the same bytes
    big = torch.randn(40, 64, generator=g)
    np.testing.assert_array_equal(q4_0_bytes_chunked(big, rows=16), q4_0_bytes(big))
    # 3-D expert tensors keep their leading dims
    assert q4_0_bytes(torch.randn(3, 4, 64, generator=g)).shape == (3, 4, 36)


def _rope_neox(x_TD, pos, theta):
    """rotate-half RoPE (ours, model/model.py)."""
    d = x_TD.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    rot = torch.cat([-x_TD[..., d // 2:], x_TD[..., : d // 2]], -1)
    return x_TD * cos + rot * sin


def _rope_norm(x_TD, pos, theta):
    """adjacent-pair RoPE (llama.cpp's LLAMA_ROPE_TYPE_NORM): pair (2i, 2i+1) rotated by pos * theta^(-2i/d)."""
    d = x_TD.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = pos[:, None].double() * inv[None]
    x0, x1 = x_TD[..., 0::2], x_TD[..., 1::2]
    out = torch.empty_like(x_TD)
    out[..., 0::2] = x0 * f.cos() - x1 * f.sin()
    out[..., 1::2] = x0 * f.sin() + x1 * f.cos()
    return out


def test_rope_permutation_preserves_attention_scores():
    g = torch.Generator().manual_seed(1)
    H, KV, hd, D, T = 4, 2, 16, 32, 9
    wq, wk = torch.randn(H * hd, D, generator=g, dtype=torch.float64), torch.randn(KV * hd, D, generator=g,
                                                                                  dtype=torch.float64)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    wq_p, wk_p = rope_neox_to_norm(wq, H, hd), rope_neox_to_norm(wk, KV, hd)
    assert not torch.equal(wq_p, wq)
    for h in range(H):
        kv = h // (H // KV)
        q = _rope_neox((x @ wq.T)[:, h * hd:(h + 1) * hd], pos, 1e4)
        k = _rope_neox((x @ wk.T)[:, kv * hd:(kv + 1) * hd], pos, 1e4)
        qp = _rope_norm((x @ wq_p.T)[:, h * hd:(h + 1) * hd], pos, 1e4)
        kp = _rope_norm((x @ wk_p.T)[:, kv * hd:(kv + 1) * hd], pos, 1e4)
        torch.testing.assert_close(qp @ kp.T, q @ k.T, rtol=1e-10, atol=1e-10)


def test_exporter_refuses_what_llama_cpp_cannot_compute():
    # sigmoid routing goes to glm4moe: every paper preset is expressible, a shared expert that is not a whole
    # number of expert widths (or none) and trailing dense layers are not
    for size in ("S", "M", "L"):
        _check_supported(get_config(size))
    sig = dict(router_score="sigmoid", router_bias_coeff=1e-3)
    _check_supported(get_config("tiny", **sig, norm_topk_prob=False, dense_layers=(0,)))
    with pytest.raises(ValueError, match="glm4moe graph needs a shared expert"):
        _check_supported(get_config("tiny", **sig, shared_ffn_dim=96))  # expert width 64
    with pytest.raises(ValueError, match="glm4moe graph needs a shared expert"):
        _check_supported(get_config("tiny", **sig, n_shared_experts=0, shared_ffn_dim=0))
    with pytest.raises(ValueError, match="dense layers must lead"):
        _check_supported(get_config("tiny", **sig, dense_layers=(3,)))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        _check_supported(get_config("tiny", norm_topk_prob=False))
    with pytest.raises(ValueError, match="dense layers must lead"):
        _check_supported(get_config("tiny", dense_layers=(2,)))
    _check_supported(get_config("tiny", dense_layers=(0, 1)))
    _check_supported(get_config("dense-1B"))


def test_tokenizer_metadata_raw_bytes_padded_to_vocab():
    t = tokenizer_metadata(300, None)
    assert len(t["tokens"]) == len(t["types"]) == 300
    assert len(set(t["tokens"])) == 300  # llama.cpp maps token text -> id: duplicates would collide
    assert t["tokens"][ord("A")] == "A" and t["types"][ord("A")] == 1
    assert t["types"][299] == 5 and t["merges"]


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from mobile.gguf_export import main

    assert main(["--random-init", "--size", "nope", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size" in err[0] and "nope" in err[0]
    assert not (tmp_path / "x.gguf").exists()


def test_f16_export_refuses_weights_outside_fp16_and_keeps_the_old_file(tmp_path):
    """numpy would write |w| > 65504 as inf; the exporter names the tensor instead, and the GGUF already at
    the destination is left as it was (atomic write)."""
    from mobile.gguf_export import export_model_dir
    from model.io import save_model_dir
    from model.model import MobileMoE

    model = MobileMoE(get_config("tiny", n_layers=2, max_seq_len=64)).eval()
    out = export_model_dir(save_model_dir(model, tmp_path / "ok"), tmp_path / "m.gguf", "f16")
    before = out.read_bytes()
    with torch.no_grad():
        model.layers[1].attn.wo.weight[3, 5] = 7.0e4
    bad = save_model_dir(model, tmp_path / "big")
    with pytest.raises(ValueError, match=r"blk\.1\.attn_output.*65504.*--type f32"):
        export_model_dir(bad, out, "f16")
    assert out.read_bytes() == before
    export_model_dir(bad, tmp_path / "m32.gguf", "f32")  # F32 holds it


# ---- parity with llama.cpp ----------------------------------------------------------------------------------
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="llama-cpp-python not installed (the bench extra; make bench-mobile installs it)")


def llama_logits(path, ids: list[int], exact: bool) -> np.ndarray:
    """All-position logits from llama.cpp (low-level API, one batch, 1 thread for a fixed summation order).
    exact: F32 KV cache and flash attention off (its CPU kernel rounds Q to F16), so F32 weights compute in
    F32 end to end; otherwise llama.cpp's defaults (F16 KV cache, flash attention auto = on)."""
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 64, 64, 1, 1
    if exact:
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    assert ctx
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    b = L.llama_batch_init(len(ids), 0, 1)
    try:
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, True
            b.seq_id[i][0] = 0
        assert L.llama_decode(ctx, b) == 0
        out = np.stack([np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, i),
                                                          ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()
                        for i in range(len(ids))])
    finally:
        L.llama_batch_free(b)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return out


def _tiny_model(tmp_path, dense: bool):
    from model.io import save_model_dir
    from model.model import MobileMoE

    if dense:
        cfg = get_config("tiny", n_experts=0, top_k=0, expert_ffn_dim=0, n_shared_experts=0, shared_ffn_dim=0,
                         n_layers=3, init_std=0.08, max_seq_len=64)
    else:
        # a leading dense layer and a non-zero selection bias exercise those paths of the ernie4_5-moe graph
        cfg = get_config("tiny", n_layers=3, dense_layers=(0,), router_bias_coeff=1e-3, init_std=0.08,
                         max_seq_len=64)
    model = MobileMoE(cfg).eval()
    if not dense:
        g = torch.Generator().manual_seed(3)
        for layer in model.layers:
            if layer.is_moe:
                layer.moe.expert_bias.copy_(torch.rand(cfg.n_experts, generator=g) * 0.05)
    d = save_model_dir(model, tmp_path / ("dense" if dense else "moe"))
    return model, d


def _ours(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = [int(x) for x in np.random.default_rng(0).integers(0, 2048, 24)]


@needs_llama
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_llama_cpp_parity_f32_and_f16(tmp_path, dense):
    from mobile.gguf_export import export_model_dir

    model, d = _tiny_model(tmp_path, dense)
    ref = _ours(model, IDS)
    assert ref.std() > 0.1  # logits with real spread, or the comparison says little
    f32 = export_model_dir(d, tmp_path / "m-f32.gguf", "f32")
    f16 = export_model_dir(d, tmp_path / "m-f16.gguf", "f16")
    got32 = llama_logits(f32, IDS, exact=True)
    got16 = llama_logits(f16, IDS, exact=False)
    # Tolerances: max |logit diff| / max |logit|. F32 end to end, only the summation order differs (measured
    # 1.0e-6 MoE, 1.3e-6 dense): same routing, gates, shared expert, RoPE permutation, norms.
    assert _rel_err(got32, ref) < 2e-5, _rel_err(got32, ref)
    # F16 weights with llama.cpp's defaults (F16 KV cache, flash attention): fp16 rounding (measured 1.5e-3
    # MoE, 2.7e-3 dense); 1e-2 is the stated tolerance.
    assert _rel_err(got16, ref) < 1e-2, _rel_err(got16, ref)
    assert (got16.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@needs_llama
def test_llama_cpp_q4_0_matches_our_int4_weights(tmp_path):
    """Q4_0 carries our INT4 weights exactly; llama.cpp then quantizes activations to Q8_0 per 32 (we use
    int8 per token), so the comparison is with the INT4-weight / float-activation model, loosely."""
    from mobile.gguf_export import export_model_dir
    from model.quant import fake_quant_int4

    model, d = _tiny_model(tmp_path, dense=False)
    q4 = export_model_dir(d, tmp_path / "m-q4_0.gguf", "q4_0")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "router" not in n:
                p.copy_(fake_quant_int4(p))
    ref = _ours(model, IDS)
    got = llama_logits(q4, IDS, exact=False)
    assert _rel_err(got, ref) < 0.1, _rel_err(got, ref)
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > 0.995 and not math.isnan(corr)


@needs_llama
@pytest.mark.parametrize("router_dtype", ["f32", "f16"])
def test_llama_cpp_runs_the_engines_mmoe_file(tmp_path, router_dtype):
    """--from-mmoe: the phone engine's .mmoe, re-laid out as Q4_0 without requantizing, gives llama.cpp the
    same model: its logits match our engine's (int8 per-token activations vs llama.cpp's Q8_0 per 32, so a
    loose tolerance; measured max rel. error 1.0e-2, top-1 agreement 100%). An fp16 router (format version 2)
    goes out as F32 holding exactly its fp16 values."""
    import gguf

    from mobile.engine import Engine, default_lib_path
    from mobile.export import export_random
    from mobile.format import DT_F16, read_table
    from mobile.gguf_export import mmoe_to_gguf

    if not default_lib_path().is_file():
        pytest.skip("the C engine is not built (make mobile)")
    mm = export_random("tiny", tmp_path / "t.mmoe", seed=1, router_dtype=router_dtype)
    gg = mmoe_to_gguf(mm, tmp_path / "t.gguf")
    buf = mm.read_bytes()
    rt = {e.name: e for e in read_table(buf)}["layers.1.moe.router"]
    want = np.frombuffer(buf, "<f2" if rt.dtype == DT_F16 else "<f4", rt.size // (2 if rt.dtype == DT_F16 else 4),
                         rt.offset).astype(np.float32).reshape(rt.shape)
    assert (rt.dtype == DT_F16) == (router_dtype == "f16")
    got_r = next(t for t in gguf.GGUFReader(str(gg)).tensors if t.name == "blk.1.ffn_gate_inp.weight")
    assert got_r.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(got_r.data).reshape(rt.shape), want)
    ids = IDS[:12]
    got = llama_logits(gg, ids, exact=True)
    eng = Engine(str(mm), threads=1)
    try:
        ours = np.stack([eng.eval([t]) for t in ids]).astype(np.float64)
    finally:
        eng.close()
    assert ours.std() > 0.1
    assert _rel_err(got, ours) < 0.05, _rel_err(got, ours)
    assert (got.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


# ---- sigmoid routing + selection bias -> llama.cpp's glm4moe ------------------------------------------------
def _sigmoid_model(tmp_path):
    """The paper presets' router on tiny shapes (sigmoid, top-4 renormalised, one shared expert of the expert
    width), a leading dense layer and a non-zero selection bias."""
    from model.io import save_model_dir
    from model.model import MobileMoE

    cfg = get_config("tiny", n_layers=3, dense_layers=(0,), router_score="sigmoid", router_bias_coeff=1e-3,
                     top_k=4, shared_ffn_dim=64, init_std=0.08, max_seq_len=64)
    model = MobileMoE(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_moe:
                layer.moe.expert_bias.copy_((torch.rand(cfg.n_experts, generator=g) - 0.5) * 0.6)
    return model, save_model_dir(model, tmp_path / "sigmoid")


def test_glm4moe_gguf_holds_the_sigmoid_router_bias_and_unpermuted_rope(tmp_path):
    """Read back with gguf's reader (no llama.cpp): the keys the glm4moe loader reads, and every tensor it
    creates (exp_probs_b = our bias, zero q/k/v biases, post_attention_norm), q/k rows unpermuted (NEOX)."""
    import gguf

    from mobile.export import export_model_dir as mmoe_export
    from mobile.gguf_export import export_model_dir, mmoe_to_gguf

    model, d = _sigmoid_model(tmp_path)
    cfg = model.cfg
    r = gguf.GGUFReader(str(export_model_dir(d, tmp_path / "s-f32.gguf", "f32")))

    def key(name):
        f = r.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()[0]

    assert key("general.architecture") == "glm4moe"
    assert key("glm4moe.expert_gating_func") == 2 and key("glm4moe.expert_weights_scale") == 1.0
    assert bool(key("glm4moe.expert_weights_norm")) and key("glm4moe.expert_shared_count") == 1
    assert key("glm4moe.leading_dense_block_count") == 1 and key("glm4moe.nextn_predict_layers") == 0
    assert (key("glm4moe.expert_count"), key("glm4moe.expert_used_count")) == (16, 4)
    assert key("glm4moe.rope.dimension_count") == cfg.head_dim
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    for i, layer in enumerate(model.layers):
        b = f"blk.{i}."
        np.testing.assert_array_equal(t[b + "attn_q.weight"].reshape(-1, cfg.d_model), layer.attn.wq.weight.detach())
        np.testing.assert_array_equal(t[b + "attn_k.weight"].reshape(-1, cfg.d_model), layer.attn.wk.weight.detach())
        np.testing.assert_array_equal(t[b + "post_attention_norm.weight"], layer.ffn_norm.weight.detach())
        assert b + "ffn_norm.weight" not in t
        for q in ("q", "k", "v"):
            assert not t[b + f"attn_{q}.bias"].any()
        if layer.is_moe:
            bias = layer.moe.expert_bias.numpy()
            assert np.abs(bias).max() > 0.1
            np.testing.assert_array_equal(t[b + "exp_probs_b.bias"], bias)
    # the .mmoe conversion (what bench.mobile gives llama.cpp) writes the same tensor set
    mm = mmoe_export(d, tmp_path / "s.mmoe")
    r2 = gguf.GGUFReader(str(mmoe_to_gguf(mm, tmp_path / "s-q4.gguf")))
    assert {x.name for x in r2.tensors} == set(t)
    t2 = {x.name: np.asarray(x.data) for x in r2.tensors}
    np.testing.assert_array_equal(t2["blk.1.exp_probs_b.bias"], model.layers[1].moe.expert_bias.numpy())


@needs_llama
def test_llama_cpp_glm4moe_parity_sigmoid_bias_f32(tmp_path):
    """llama.cpp's glm4moe graph on our sigmoid-routed model with a non-zero selection bias, F32 end to end:
    the same tolerance as the ernie4_5-moe F32 parity above (summation order only). Not measured on the
    machine that wrote it (no llama-cpp-python there)."""
    from mobile.gguf_export import export_model_dir

    model, d = _sigmoid_model(tmp_path)
    ref = _ours(model, IDS)
    assert ref.std() > 0.1
    got = llama_logits(export_model_dir(d, tmp_path / "s-f32.gguf", "f32"), IDS, exact=True)
    assert _rel_err(got, ref) < 2e-5, _rel_err(got, ref)
    # and the bias matters: without it llama.cpp's logits would be far from ours
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_moe:
                layer.moe.expert_bias.zero_()
    assert _rel_err(got, _ours(model, IDS)) > 1e-3
