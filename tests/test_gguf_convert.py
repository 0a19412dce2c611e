"""The .mmoe -> GGUF conversion behind every ours-vs-llama.cpp number, read back with the `gguf` package's reader.

Needs only `gguf` (pure Python, a core dependency), not llama.cpp, so it runs in CI: every tensor llama.cpp would
load is present with the right name, type and shape, and its Q4_0 blocks decode (ggml's rule, written out below)
to exactly the INT4 values of our QAT/export format, RoPE row permutation included. The llama.cpp parity tests in
test_gguf.py then only add what llama.cpp computes from these bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobile.gguf_export import export_model_dir as gguf_export_model_dir
from mobile.gguf_export import mmoe_to_gguf, rope_neox_to_norm
from model.config import get_config
from model.quant import dequantize_int4, quantize_int4

gguf = pytest.importorskip("gguf")  # a core dependency: in CI a module skip fails the run (tests/conftest.py)


def _ggml_q4_0_decode(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's dequantize_row_q4_0: per 18-byte block, d = fp16 at bytes 0-1, then 16 bytes of nibbles,
    y[j] = (lo(qs[j]) - 8) * d and y[j + 16] = (hi(qs[j]) - 8) * d."""
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 2:].astype(np.int32)
    return (np.concatenate([(qs & 0xF) - 8, (qs >> 4) - 8], axis=1) * d).reshape(shape)


def _int4(w: torch.Tensor) -> np.ndarray:
    q, s = quantize_int4(w.detach().float())
    return dequantize_int4(q, s).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mobile.export import export_model_dir as mmoe_export_model_dir
    from model.io import save_model_dir
    from model.model import MobileMoE

    d = tmp_path_factory.mktemp("gguf")
    cfg = get_config("tiny", n_layers=3, dense_layers=(0,), init_std=0.08, max_seq_len=64)
    model = MobileMoE(cfg).eval()
    mdir = save_model_dir(model, d / "model")
    mm = mmoe_export_model_dir(mdir, d / "t.mmoe")
    return cfg, model, mdir, mm, d


def _expected(cfg, model) -> dict[str, np.ndarray]:
    """GGUF name -> float weights llama.cpp must see, from our parameters (same mapping as the exporter's
    docs: gate/up split, q/k rows permuted from NeoX to interleaved RoPE order)."""
    H, KV, hd, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.expert_ffn_dim
    out = {"token_embd.weight": model.tok_emb.weight, "output_norm.weight": model.norm.weight}
    for i, L in enumerate(model.layers):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"], out[b + "ffn_norm.weight"] = L.attn_norm.weight, L.ffn_norm.weight
        out[b + "attn_q.weight"] = rope_neox_to_norm(L.attn.wq.weight.detach(), H, hd)
        out[b + "attn_k.weight"] = rope_neox_to_norm(L.attn.wk.weight.detach(), KV, hd)
        out[b + "attn_v.weight"], out[b + "attn_output.weight"] = L.attn.wv.weight, L.attn.wo.weight
        if L.is_moe:
            m = L.moe
            out[b + "ffn_gate_inp.weight"] = m.router.weight
            out[b + "ffn_gate_exps.weight"] = m.w_gate_up[:, :F]
            out[b + "ffn_up_exps.weight"] = m.w_gate_up[:, F:]
            out[b + "ffn_down_exps.weight"] = m.w_down
            S = m.shared.w_gate_up.weight.shape[0] // 2
            out[b + "ffn_gate_shexp.weight"] = m.shared.w_gate_up.weight[:S]
            out[b + "ffn_up_shexp.weight"] = m.shared.w_gate_up.weight[S:]
            out[b + "ffn_down_shexp.weight"] = m.shared.w_down.weight
        else:
            Fd = L.ffn.w_gate_up.weight.shape[0] // 2
            out[b + "ffn_gate.weight"] = L.ffn.w_gate_up.weight[:Fd]
            out[b + "ffn_up.weight"] = L.ffn.w_gate_up.weight[Fd:]
            out[b + "ffn_down.weight"] = L.ffn.w_down.weight
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _read(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


def test_mmoe_to_gguf_holds_the_engines_int4_weights_exactly(tiny):
    cfg, model, _mdir, mm, d = tiny
    got = _read(mmoe_to_gguf(mm, d / "from-mmoe.gguf"))
    want = _expected(cfg, model)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    Q40, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    n_q4 = 0
    for name, w in want.items():
        t = got[name]
        if w.dim() == 1 or name.endswith("ffn_gate_inp.weight"):  # norms and the router stay fp32
            assert t.tensor_type == F32, name
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.numpy(), err_msg=name)
            continue
        assert t.tensor_type == Q40, name
        dec = _ggml_q4_0_decode(np.asarray(t.data), tuple(w.shape))
        # the exact values the phone engine and the QAT forward use: no requantization on the way
        np.testing.assert_array_equal(dec, _int4(w), err_msg=name)
        n_q4 += 1
    # embedding + 3 layers x 4 attention + the dense layer's 3 FFN + 2 MoE layers x (3 expert + 3 shared)
    assert n_q4 == 1 + 3 * 4 + 3 + 2 * 6


def test_gguf_f32_export_of_a_model_dir_is_lossless(tiny):
    cfg, model, mdir, _mm, d = tiny
    got = _read(gguf_export_model_dir(mdir, d / "f32.gguf", "f32"))
    want = _expected(cfg, model)
    assert set(want) <= set(got)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[name].data).reshape(w.shape), w.numpy(), err_msg=name)
