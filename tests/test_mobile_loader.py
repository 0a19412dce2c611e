"""Hardening: the C loader rejects truncated, wrong-magic, wrong-version, misaligned, out-of-range and
shape-inconsistent files with one clear line and exit status 2 (bad input, model/cli.py's convention); the
exporter writes the QAT INT4 bytes."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from mobile import format as fmt
from tests._mobile_util import BUILD, ROOT, build_engine


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    build_engine()
    from mobile.export import export_random

    p = tmp_path_factory.mktemp("mmoe") / "tiny.mmoe"
    export_random("tiny", p, seed=3, n_layers=2)
    return p


def run_check(path):
    return subprocess.run([str(BUILD / "mmoe-run"), str(path), "--check"], capture_output=True, text=True)


def mutated(valid, tmp_path, edit):
    buf = bytearray(valid.read_bytes())
    res = edit(buf)
    if res is not None:  # edits that slice return a new buffer; in-place edits return None
        buf = res
    p = tmp_path / "bad.mmoe"
    p.write_bytes(bytes(buf))
    return p


def entry(buf, name):
    return next(e for e in fmt.read_table(bytes(buf)) if e.name == name)


def set_entry(buf, e, **kw):
    off = fmt.table_entry_offset(bytes(buf), e.index)
    shape = list(kw.get("shape", e.shape)) + [0] * (4 - len(kw.get("shape", e.shape)))
    struct.pack_into("<64sII4IQQ", buf, off, e.name.encode(), kw.get("dtype", e.dtype), len(kw.get("shape", e.shape)),
                     *shape, kw.get("offset", e.offset), kw.get("size", e.size))


def _in_order(*_edits):
    """Several in-place edits as one case (applied as its arguments are evaluated, left to right)."""


def _to_f16(buf, name):
    """The entry as f16 of the same shape (half the size, same offset): a consistent table entry."""
    e = entry(buf, name)
    set_entry(buf, e, dtype=fmt.DT_F16, size=e.size // 2)


def set_header(buf, field, value):
    off, code = fmt.header_field_offset(field)
    struct.pack_into("<" + code, buf, off, value)


def test_valid_file_loads(valid):
    r = run_check(valid)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok:") and "2 layers" in r.stdout


CASES = {
    "truncated": (lambda b: b[:-100], "truncated"),
    "truncated_header": (lambda b: b[:500], "too small"),
    "empty": (lambda b: bytearray(), "too small"),
    "wrong_magic": (lambda b: b.__setitem__(slice(0, 8), b"GGUF\0\0\0\0"), "bad magic"),
    "wrong_version": (lambda b: set_header(b, "version", 3), "unsupported format version 3"),
    "version_zero": (lambda b: set_header(b, "version", 0), "unsupported format version 0"),
    # an f16 router (size consistent with its shape) is version 2 only: a version-1 file holding one is refused
    "f16_router_in_v1": (lambda b: _to_f16(b, "layers.1.moe.router"), "an f16 router needs format version 2"),
    # version 2 admits f16 for the router only; any other f32 tensor as f16 is still refused by name
    "f16_norm_in_v2": (lambda b: _in_order(set_header(b, "version", 2), _to_f16(b, "layers.0.ffn_norm")),
                       "tensor 'layers.0.ffn_norm': dtype 1 / ndim 1, expected 0 / 1"),
    "f16_router_bad_size": (lambda b: _in_order(set_header(b, "version", 2), _to_f16(b, "layers.0.moe.router"),
                                       set_entry(b, entry(b, "layers.0.moe.router"),
                                                 size=entry(b, "layers.0.moe.router").size * 2)),
                            "inconsistent with its dtype and shape"),
    "f16_router_bad_shape": (lambda b: _in_order(set_header(b, "version", 2), _to_f16(b, "layers.0.moe.router"),
                                        set_entry(b, entry(b, "layers.0.moe.router"), shape=(8, 128),
                                                  size=2 * 8 * 128)),
                             "tensor 'layers.0.moe.router': shape[0] = 8 inconsistent with the config"),
    "misaligned_offset": (lambda b: set_entry(b, entry(b, "layers.0.attn.wq"),
                                              offset=entry(b, "layers.0.attn.wq").offset + 4), "misaligned"),
    "offset_out_of_range": (lambda b: set_entry(b, entry(b, "layers.1.attn.wo"), offset=len(b) + 4096),
                            "out of range"),
    "offset_overflow": (lambda b: set_entry(b, entry(b, "norm"), offset=(1 << 64) - 64), "out of range"),
    "size_vs_shape": (lambda b: set_entry(b, entry(b, "layers.0.attn.wk"), shape=(64, 128 + 32)),
                      "inconsistent with its dtype and shape"),
    # shape and size agree with each other but not with the config: rejected by name
    "shape_vs_config": (lambda b: set_entry(b, entry(b, "layers.0.attn.wk"), shape=(32, 128),
                                            size=fmt.q4_bytes(32, 128)), "inconsistent with the config"),
    "config_vs_tensors": (lambda b: set_header(b, "d_model", 256), "inconsistent"),
    "bad_config": (lambda b: set_header(b, "n_heads", 3), "n_heads 3 / n_kv_heads 2 inconsistent"),
    "top_k_gt_experts": (lambda b: set_header(b, "top_k", 17), "top_k 17 out of range"),
    "missing_tensor": (lambda b: b.__setitem__(slice(fmt.table_entry_offset(bytes(b), entry(b, "norm").index),
                                                     fmt.table_entry_offset(bytes(b), entry(b, "norm").index) + 4),
                                               b"xorm"), "tensor 'norm' is missing"),
    # found by a 20,000-case fuzz run: an all-MoE model's unused ffn_dim once sized the FFN buffers
    "unused_ffn_dim_huge": (lambda b: set_header(b, "ffn_dim", 0xFFFFFFF0), "ffn_dim 4294967280"),
    "table_out_of_range": (lambda b: set_header(b, "n_tensors", 10**5), "n_tensors"),
    "tokenizer_range": (lambda b: set_header(b, "tok_size", 1 << 40), "tokenizer range"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_rejects(valid, tmp_path, case):
    edit, msg = CASES[case]
    r = run_check(mutated(valid, tmp_path, edit))
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert msg in lines[0], lines[0]


def test_python_binding_and_cli_reject_cleanly(valid, tmp_path):
    from mobile import Engine

    bad = mutated(valid, tmp_path, lambda b: set_header(b, "version", 9))
    with pytest.raises(ValueError, match="unsupported format version 9"):
        Engine(bad)
    r = subprocess.run([sys.executable, "-m", "mobile", "generate", "--model", str(bad), "--prompt", "x"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert str(bad) in r.stderr and "unsupported format version 9" in r.stderr


def test_export_is_bit_exact_with_quant_py(tmp_path):
    """The file's INT4 bytes are model/quant.py's quantize_int4 + pack_int4 of the trained weights."""
    import torch

    from mobile.export import export_model_dir
    from model.config import get_config
    from model.io import save_model_dir
    from model.model import MobileMoE
    from model.quant import pack_int4, quantize_int4

    model = MobileMoE(get_config("tiny", n_layers=1, init_std=0.05, router_bias_coeff=1e-3)).set_qat(True)
    with torch.no_grad():
        model.layers[0].moe.expert_bias.copy_(torch.linspace(-0.01, 0.01, 16))
    save_model_dir(model, tmp_path / "m")
    out = export_model_dir(tmp_path / "m", tmp_path / "m.mmoe")
    buf = out.read_bytes()
    tab = {e.name: e for e in fmt.read_table(buf)}

    def q4(w):
        q, s = quantize_int4(w.detach().float())
        return pack_int4(q).numpy().tobytes() + s.numpy().astype("<f2").tobytes()

    e = tab["layers.0.attn.wq"]
    assert buf[e.offset:e.offset + e.size] == q4(model.layers[0].attn.wq.weight)
    e = tab["tok_emb"]
    assert buf[e.offset:e.offset + e.size] == q4(model.tok_emb.weight)
    moe, e = model.layers[0].moe, tab["layers.0.moe.experts"]
    rec = fmt.expert_record_bytes(64, 128)
    for x in (0, 7, 15):  # each expert: [gate_up | pad][down | pad], contiguous
        start = e.offset + x * rec
        gu, dn = q4(moe.w_gate_up[x]), q4(moe.w_down[x])
        assert buf[start:start + len(gu)] == gu
        d0 = start + fmt.align_up(len(gu))
        assert buf[d0:d0 + len(dn)] == dn
    e = tab["layers.0.moe.expert_bias"]
    np.testing.assert_array_equal(np.frombuffer(buf, "<f4", 16, e.offset), moe.expert_bias.numpy())
    h = fmt.read_header(buf)
    assert h["file_size"] == len(buf) and h["d_model"] == 128 and h["layer_kinds"] == [1]
    assert all(t.offset % 64 == 0 for t in tab.values())


@pytest.mark.parametrize("size", ["S", "M", "L", "dense-1B"])
def test_random_init_presets_load(tmp_path, size):
    """Every preset's layout (2 layers, small vocab, to keep the test small) loads and runs in C."""
    from mobile.export import export_random

    p = export_random(size, tmp_path / f"{size}.mmoe", n_layers=2, vocab_size=512, dense_layers=())
    build_engine()
    r = subprocess.run([str(BUILD / "mmoe-run"), str(p), "--prompt-ids", "1,2,3", "-n", "2", "--greedy", "--ids"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().split(",")) == 2
