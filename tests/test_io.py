"""model/io.py: the model-directory hand-off (exact round trip, atomic writes, refusal of bad input)."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import get_config
from model.io import load_model_dir, save_model_dir, tokenizer_path
from model.model import MobileMoE


@pytest.fixture(scope="module")
def small_model():
    cfg = get_config("tiny", n_layers=2, vocab_size=256, dense_layers=(1,), tie_embeddings=False,
                     router_bias_coeff=1e-3, seed=3)
    m = MobileMoE(cfg)
    m.layers[0].moe.expert_bias.copy_(torch.linspace(-0.01, 0.01, cfg.n_experts))  # a buffer worth saving
    return m


def test_round_trip_exact(tmp_path, small_model):
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0"}')
    out = save_model_dir(small_model, tmp_path / "m", tokenizer_json=tok, extra={"step": 5})
    model, meta = load_model_dir(out)
    assert model.cfg == small_model.cfg and meta["step"] == 5 and meta["qat"] is False
    ref = small_model.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not model.training
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    small_model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), small_model(ids))
    assert tokenizer_path(out).read_text() == tok.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_qat_flag_restored(tmp_path):
    m = MobileMoE(get_config("tiny", n_layers=1, vocab_size=128)).set_qat(True)
    model, meta = load_model_dir(save_model_dir(m, tmp_path / "q"))
    assert meta["qat"] is True and model.qat and model.layers[0].attn.wq.qat


def test_overwrite_is_atomic_and_failed_save_keeps_old(tmp_path, small_model):
    out = tmp_path / "m"
    save_model_dir(small_model, out)
    before = (out / "model.safetensors").read_bytes()
    other = MobileMoE(get_config("tiny", n_layers=1, vocab_size=128, seed=9))
    with pytest.raises(FileNotFoundError):  # tokenizer missing -> the save fails after writing weights
        save_model_dir(other, out, tokenizer_json=tmp_path / "does-not-exist.json")
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    save_model_dir(other, out)  # a successful overwrite replaces it
    assert load_model_dir(out)[0].cfg.n_layers == 1


def test_refuses_missing_and_corrupt(tmp_path, small_model):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model_dir(tmp_path / "nothing")
    out = save_model_dir(small_model, tmp_path / "m")
    w = out / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model_dir(out)
    w.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model_dir(out)
    w.write_bytes(good)
    cfg_file = out / "config.json"
    meta = json.loads(cfg_file.read_text())
    cfg_file.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model_dir(out)
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "d_model": 256}}))
    with pytest.raises(ValueError, match="do not match"):
        load_model_dir(out)
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "n_kv_heads": 3}}))
    with pytest.raises(ValueError, match="n_heads"):
        load_model_dir(out)
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "colour": "red"}}))
    with pytest.raises(ValueError, match="colour"):
        load_model_dir(out)
