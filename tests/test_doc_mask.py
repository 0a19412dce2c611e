"""Document masking of packed rows (model/model.py DocMask, train/batches.py RankBatch.doc, `[data] doc_mask`):
a document's logits equal the document run alone, the loaders' document ids follow the EOS tokens, the flash-attn
varlen cu_seqlens match the mask, and each rank builds only its own rows (the same rows as the global batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import get_config
from model.model import DocMask, MobileMoE
from train.batches import Batcher, LMSource, SFTSource, document_ids
from train.loop import StageConfig, evaluate, forward_loss, rank_batch, train_stage
from train.store import StoreMixture, TokenStore, packing

EOS = 1


def _model(**ov) -> MobileMoE:
    # GQA (4 query heads over 2 KV heads), one dense and one MoE layer
    cfg = get_config("tiny", **{**dict(n_layers=2, dense_layers=(0,), vocab_size=64, max_seq_len=64), **ov})
    return MobileMoE(cfg).eval()


def _doc(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(2, 64, (n,), generator=g)).tolist()


def test_a_documents_logits_are_those_of_the_document_alone():
    m = _model()
    d1, d2, d3 = _doc(7, 1) + [EOS], _doc(9, 2) + [EOS], _doc(5, 3)
    row = torch.tensor([d1 + d2 + d3])
    row2 = torch.tensor([d2 + d3 + d1])  # a second row, document 2 first: rows are independent
    ids = torch.cat([row, row2])
    doc = document_ids(ids, EOS)
    with torch.no_grad():
        alone = m(torch.tensor([d2]))[0]
        masked = m(ids, doc_ids_BT=doc)
        plain = m(ids)
    s = slice(len(d1), len(d1) + len(d2))
    assert (masked[0, s] - alone).abs().max() < 1e-5
    assert (masked[1, :len(d2)] - alone).abs().max() < 1e-5
    with torch.no_grad():  # the last document too, and the first is a prefix run alone either way
        assert (masked[0, len(d1) + len(d2):] - m(torch.tensor([d3]))[0]).abs().max() < 1e-5
    assert (plain[0, :len(d1)] - masked[0, :len(d1)]).abs().max() < 1e-5
    # without the mask, document 2 sees document 1 (and sits at other RoPE positions)
    assert (plain[0, s] - alone).abs().max() > 1e-2
    # one document per row: the masked path is plain causal attention
    with torch.no_grad():
        one = m(ids, doc_ids_BT=torch.zeros_like(ids))
    assert (one - plain).abs().max() < 1e-5


def test_doc_mask_gradients_stay_inside_the_document():
    m = _model().train()
    d1, d2 = _doc(6, 4) + [EOS], _doc(6, 5)
    ids = torch.tensor([d1 + d2])
    emb = m.embed(ids).detach().requires_grad_(True)
    # a probe: the loss of document 2's tokens only must not depend on document 1's embeddings
    m.embed = lambda _ids: emb  # type: ignore[method-assign]
    out = m(ids, doc_ids_BT=document_ids(ids, EOS))
    out[0, len(d1):].sum().backward()
    assert float(emb.grad[0, :len(d1)].abs().max()) == 0.0 and float(emb.grad[0, len(d1):].abs().max()) > 0


def _varlen_reference(q_NHd, k_NKd, v_NKd, cu):
    """What flash_attn_varlen_func(causal=True) computes: causal attention inside each [cu[i], cu[i+1])."""
    out = torch.empty_like(q_NHd)
    rep = q_NHd.shape[1] // k_NKd.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = (t[a:b].transpose(0, 1) for t in (q_NHd, k_NKd, v_NKd))
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                           is_causal=True)
        out[a:b] = o.transpose(0, 1)
    return out


def test_cu_seqlens_positions_and_mask():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3]])
    dm = DocMask(doc)
    cu, mx = dm.varlen()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6, 7, 12, 18] and mx == 6
    assert dm.positions().tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    mask = dm.sdpa_mask()[:, 0]
    for b in range(3):
        for i in range(6):
            for j in range(6):
                assert bool(mask[b, i, j]) == (doc[b, i] == doc[b, j] and j <= i)
    # the varlen segments over the flattened rows attend exactly as the SDPA mask does (GQA: 4 over 2 heads)
    g = torch.Generator().manual_seed(0)
    B, T, H, KV, hd = 3, 6, 4, 2, 8
    q, k, v = (torch.randn(B, n, T, hd, generator=g) for n in (H, KV, KV))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dm.sdpa_mask(), enable_gqa=True)
    got = _varlen_reference(*(t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v)), cu)
    assert (got.reshape(B, T, H, hd).transpose(1, 2) - want).abs().max() < 1e-6
    with pytest.raises(ValueError, match="doc_ids shape"):
        _model()(torch.zeros(1, 5, dtype=torch.long), doc_ids_BT=torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------
# loaders
def _store(tmp_path, toks: np.ndarray) -> TokenStore:
    import json

    d = tmp_path / "s"
    d.mkdir()
    toks.astype(np.uint16).tofile(d / "shard_00000.bin")
    man = dict(format="mobilemoe-tokens-1", dtype="uint16", vocab_size=64, eos_id=EOS, shard_tokens=len(toks),
               shards=[dict(file="shard_00000.bin", tokens=len(toks))], complete=True, tokens=len(toks))
    (d / "manifest.json").write_text(json.dumps(man))
    return TokenStore(d)


def _stream(n_docs: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.append(rng.integers(2, 64, size=rng.integers(3, 30)), EOS) for _ in range(n_docs)])


def test_store_loader_doc_ids_follow_eos_and_rank_rows(tmp_path):
    st = _store(tmp_path, _stream())
    off = StoreMixture([st], [1.0], 32, 8, seed=3)
    on = StoreMixture([st], [1.0], 32, 8, seed=3, doc_mask=True)
    for step in (0, 5):
        full, mask = off.get(step)
        assert off.rank_batch(step).doc is None
        for world in (1, 2, 4):
            for r in range(world):
                rb = on.rank_batch(step, r, world)
                rows = full[r * 8 // world:(r + 1) * 8 // world]
                assert torch.equal(rb.ids, rows) and rb.n_targets == int(mask.sum()) == 8 * 32
                inp = rb.ids[:, :-1].numpy()
                d = rb.doc.numpy()
                assert np.array_equal(d, packing(inp, EOS)[0])
                # the document id steps up right after each EOS and nowhere else
                assert np.array_equal(np.diff(d, axis=1) != 0, inp[:, :-1] == EOS) and (d[:, 0] == 0).all()
    assert (on.rank_batch(0).ids == EOS).any()
    with pytest.raises(Exception, match="EOS id 7"):
        on.set_doc_mask(True, 7)


def test_batcher_rank_rows_are_the_global_batchs_rows():
    lm = LMSource(torch.from_numpy(_stream(seed=1)))
    sft = SFTSource([(list(range(2, 2 + n)) + [EOS], [0] * (n // 2) + [1] * (n - n // 2 + 1)) for n in (4, 9, 13)])
    b = Batcher([lm, sft], [0.5, 0.5], 16, 8, seed=3)
    for step in (0, 7):
        ids, mask = b.get(step)
        for world in (1, 2, 4):
            parts = [b.rank_batch(step, r, world) for r in range(world)]
            assert torch.equal(torch.cat([p.ids for p in parts]), ids)
            assert torch.equal(torch.cat([p.mask for p in parts]), mask)
            assert all(p.n_targets == int(mask.sum()) and p.doc is None for p in parts)
    b.set_doc_mask(True, EOS)
    rb = b.rank_batch(7, 1, 2)
    assert torch.equal(rb.doc, document_ids(rb.ids[:, :-1], EOS))
    with pytest.raises(ValueError, match="split evenly"):
        b.rank_batch(0, 0, 3)


class _GetOnly:
    """The pre-rank_batch interface: the whole global batch from get()."""

    def __init__(self, b):
        self.b = b

    def get(self, step):
        return self.b.get(step)


def test_train_stage_per_rank_rows_match_the_global_batch_path_and_doc_mask_trains(monkeypatch):
    import train.loop as L

    torch.manual_seed(0)
    data = torch.from_numpy(_stream(200, seed=2))
    st = StageConfig(name="t", tokens=3 * 8 * 32, seq_len=32, global_batch=8, micro_batch=4, lr=3e-3,
                     ckpt_every=10**9)
    small = dict(d_model=64, n_experts=4, expert_ffn_dim=32, shared_ffn_dim=32, ffn_dim=64)
    runs = {}
    for name in ("rank_batch", "get", "doc_mask"):
        b = Batcher([LMSource(data)], [1.0], 32, 8, seed=1)
        if name == "doc_mask":
            b.set_doc_mask(True, EOS)
        losses = []

        def spy(*a, _real=forward_loss, _out=losses, **k):
            s, c = _real(*a, **k)
            _out.append(float(s.detach()))
            return s, c

        monkeypatch.setattr(L, "forward_loss", spy)
        train_stage(_model(**small).train(), st, _GetOnly(b) if name == "get" else b, stage_dir=None, resume=None,
                    progress=False)
        runs[name] = losses
    assert len(runs["get"]) == 6 and runs["rank_batch"] == runs["get"]  # bit for bit
    assert all(np.isfinite(runs["doc_mask"])) and runs["doc_mask"] != runs["get"]
    # the doc_mask loss of a batch is the sum of its documents' losses run alone (first micro-batch, step 0)
    b = Batcher([LMSource(data)], [1.0], 32, 8, seed=1)
    b.set_doc_mask(True, EOS)
    rb = rank_batch(b, 0, 0, 1)
    m = _model(**small)
    with torch.no_grad():
        s, _ = forward_loss(m, rb.ids[:1], rb.mask[:1], "cpu", rb.doc[:1])
        tot = 0.0
        for d in rb.doc[0].unique():
            idx = (rb.doc[0] == d).nonzero().squeeze(1)
            x = rb.ids[0, int(idx[0]):int(idx[-1]) + 2][None]
            tot += float(forward_loss(m, x, torch.ones(1, x.shape[1] - 1, dtype=torch.long), "cpu")[0])
    assert abs(float(s) - tot) < 1e-4 * max(1.0, abs(tot))
    # evaluation under the same masking (doc_eos): the masked loss per target; without it, another number
    assert abs(evaluate(m, rb.ids[:1], rb.mask[:1], 1, "cpu", doc_eos=EOS) - float(s) / 32) < 1e-6
    assert abs(evaluate(m, rb.ids[:1], rb.mask[:1], 1, "cpu") - float(s) / 32) > 1e-4


def test_recipe_data_doc_mask_key(tmp_path):
    from train.recipe_config import RecipeError, load_recipe_file
    from train.testing import make_corpus, stage_toml, write_recipe

    files = make_corpus(tmp_path / "c", n_docs=4)
    p = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", files["train"], 2))
    assert load_recipe_file(p).data.doc_mask is False
    text = p.read_text()
    p.write_text(text.replace("[hardware]", "[data]\ndoc_mask = true\n\n[hardware]"))
    assert load_recipe_file(p).data.doc_mask is True
    p.write_text(text.replace("[hardware]", "[data]\ndoc_mask = 1\n\n[hardware]"))
    with pytest.raises(RecipeError, match=r"\[data\] doc_mask: expected true or false"):
        load_recipe_file(p)


def test_recipe_with_doc_mask_trains_and_evaluates_with_document_ids(tmp_path, monkeypatch):
    """`[data] doc_mask = true` reaches the model through the recipe (training batches and the held-out eval), and
    keys the stage fingerprint, so a checkpoint trained with the other setting is not continued."""
    from model import cli
    from model.model import MobileMoE
    from train import recipe as R
    from train.recipe_config import load_recipe_file
    from train.testing import make_corpus, stage_toml, write_recipe

    files = make_corpus(tmp_path / "c", n_docs=8)
    off = write_recipe(tmp_path, files, stage_toml("pretrain", "pretrain", files["train"], 2))
    on = tmp_path / "on.toml"
    on.write_text(off.read_text().replace("[hardware]", "[data]\ndoc_mask = true\n\n[hardware]"))
    seen = []
    orig = MobileMoE.forward

    def spy(self, ids, *a, **k):
        seen.append((self.training, k.get("doc_ids_BT") is not None))
        return orig(self, ids, *a, **k)

    monkeypatch.setattr(MobileMoE, "forward", spy)
    assert cli.run(R.main, ["--config", str(on), "--out", str(tmp_path / "run"), "--no-generate",
                            "--threads", "1"]) == 0
    assert any(t for t, _ in seen) and any(not t for t, _ in seen), seen  # training steps and eval passes ran
    assert all(d for _, d in seen), seen  # every forward got document ids
    r_on, r_off = load_recipe_file(on), load_recipe_file(off)
    assert R.stage_fingerprint(r_on, r_on.stages[0], 100) != R.stage_fingerprint(r_off, r_off.stages[0], 100)
