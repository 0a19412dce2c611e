"""lm-eval adapter consistency on a random-init tiny MobileMoE with a byte-level BPE tokenizer built here.

The expectations are lm-eval's own: loglikelihood = sum of the continuation's token log-probs, rolling
loglikelihood = the full-sequence NLL (disjoint windows when the text is longer than the max length),
generate_until = greedy decoding cut at the first stop string. The references are computed directly from
the model (and MobileMoE.generate), not through the adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from bench.lm_eval_adapter import HFTokenizer, MobileMoELM
from model.config import get_config
from model.model import MobileMoE

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small matmuls: one thread avoids OpenMP spin contention on a shared 2-core machine (20x here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from train.tokenizer import train_bpe

    return HFTokenizer(train_bpe([TEXT * 4], vocab_size=300, special_tokens=["<|endoftext|>"]))


@pytest.fixture(scope="module")
def model(tok):
    # 2 layers keep the file fast; an untied head with a wider init makes greedy text varied (a random tied
    # model just repeats its last token, which would make the stop-string test vacuous)
    cfg = get_config("tiny", seed=1, n_layers=2, vocab_size=tok.tok.get_vocab_size(), tie_embeddings=False,
                     init_std=0.1)
    return MobileMoE(cfg).eval()


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _direct_logprob(model, ctx_ids, cont_ids):
    x = torch.tensor([ctx_ids + cont_ids[:-1]])
    with torch.no_grad():
        lp = F.log_softmax(model(x)[0].double(), -1)
    pos = torch.arange(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    return float(lp[pos, torch.tensor(cont_ids)].sum()), lp[pos].argmax(-1).tolist()


def test_loglikelihood_is_sum_of_token_logprobs(model, tok):
    lm = MobileMoELM(model=model, tokenizer=tok, engine="torch", batch_size=3)
    pairs = [("To be, or not", " to be"), ("the slings and", " arrows of outrageous fortune"),
             ("Now is the winter", " of our discontent"), ("", "sun of York"), ("whether 'tis ", "nobler")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            # lm-eval's split: trailing spaces of the context move to the continuation; split the whole encoding
            c = ctx.rstrip()
            whole, c_ids = tok.encode(c + ctx[len(c):] + cont), tok.encode(c)
            ctx_ids, cont_ids = c_ids, whole[len(c_ids):]
        else:
            ctx_ids, cont_ids = [tok.eos_id], tok.encode(cont)  # empty context -> conditioned on EOS
        ref, argmax = _direct_logprob(model, ctx_ids, cont_ids)
        assert ll == pytest.approx(ref, abs=1e-4), (ctx, cont)
        assert ll < 0
        assert greedy == (argmax == cont_ids)


def test_is_greedy_true_exactly_for_the_models_own_continuation(model, tok):
    lm = MobileMoELM(model=model, tokenizer=tok)
    ids = tok.encode("To be, or not to be")
    gen = model.generate(ids, max_new_tokens=4)  # greedy ids (model/model.py)
    other = gen[:-1] + [(gen[-1] + 1) % model.cfg.vocab_size]
    # token-level entry point of lm-eval's TemplateLM (random-model text need not round-trip through BPE)
    (ll, greedy), (ll2, greedy2) = lm._loglikelihood_tokens([(None, ids, gen), (None, ids, other)],
                                                           disable_tqdm=True)
    assert greedy is True and greedy2 is False
    assert ll > ll2


def test_loglikelihood_rolling_equals_full_sequence_nll(model, tok):
    lm = MobileMoELM(model=model, tokenizer=tok)
    ids = tok.encode(TEXT)
    x = torch.tensor([[tok.eos_id] + ids[:-1]])
    with torch.no_grad():
        nll = F.cross_entropy(model(x)[0].double(), torch.tensor(ids), reduction="sum")
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (TEXT,))], disable_tqdm=True)
    assert ll == pytest.approx(-float(nll), rel=1e-6, abs=1e-4)


def test_loglikelihood_rolling_windows_cover_every_token_once(model, tok):
    """Longer than max_length: disjoint chunks of L tokens, each conditioned on the token before it, except the
    last (shorter) chunk, which gets a full window of context (L - len(chunk) + 1 tokens) — lm-eval's rule."""
    L = 16
    lm = MobileMoELM(model=model, tokenizer=tok, max_length=L)
    ids = tok.encode(TEXT)
    assert len(ids) > 3 * L
    ref = 0.0
    for s in range(0, len(ids), L):
        chunk = ids[s:s + L]
        prev = [tok.eos_id] if s == 0 else ids[max(0, s - (L - len(chunk) + 1)):s]
        with torch.no_grad():
            lg = model(torch.tensor([prev + chunk[:-1]]))[0, -len(chunk):].double()
        ref += float(-F.cross_entropy(lg, torch.tensor(chunk), reduction="sum"))
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (TEXT,))], disable_tqdm=True)
    assert ll == pytest.approx(ref, rel=1e-6, abs=1e-4)
    # and it differs from the untruncated NLL (the windows really cut the context)
    full = MobileMoELM(model=model, tokenizer=tok).loglikelihood_rolling(
        [_req("loglikelihood_rolling", (TEXT,))], disable_tqdm=True)[0]
    assert abs(full - ll) > 1e-3


def test_generate_until_stops_at_stop_strings(model, tok):
    lm = MobileMoELM(model=model, tokenizer=tok)
    ctx = "the slings and arrows"
    ids = tok.encode(ctx)
    # independent greedy reference (model/model.py); the adapter stops at EOS and does not return it
    free_ids = model.generate(ids, max_new_tokens=24, eos_id=tok.eos_id)
    free_ids = free_ids[:-1] if free_ids[-1] == tok.eos_id else free_ids
    free = tok.decode(free_ids)
    assert len(free_ids) >= 8 and len(set(free_ids)) >= 4, free
    # a 2-character ASCII stop string that first occurs strictly inside the free-running text
    k = next(i for i in range(1, len(free) - 2)
             if free.find(free[i:i + 2]) == i and free[i:i + 2].isascii() and free[i:i + 2].strip())
    stop = free[k:k + 2]
    out = lm.generate_until([
        _req("generate_until", (ctx, {"until": [stop, "@@never@@"], "max_gen_toks": 24})),
        _req("generate_until", (ctx, {"until": ["@@never@@"], "max_gen_toks": 24})),
        _req("generate_until", (ctx, {"until": "@@never@@", "max_gen_toks": 5})),
    ], disable_tqdm=True)
    assert out[0] == free[:k]
    assert stop not in out[0]
    assert out[1] == free
    assert out[2] == tok.decode(free_ids[:5])


def test_mobile_engine_wrapper_checks_shapes(model, tok):
    """The INT4-engine path of the adapter (log-softmax of engine logits, shape check) on an engine stand-in that
    returns the torch model's logits; the real C engine is exercised in tests/test_eval_local.py."""

    class Fake:
        def logits(self, ids):
            with torch.no_grad():
                return model(torch.tensor([ids]))[0].numpy().astype(np.float32)

    lm_m = MobileMoELM(model=model, tokenizer=tok, engine="mobile", engine_obj=Fake())
    lm_t = MobileMoELM(model=model, tokenizer=tok, engine="torch")
    reqs = [_req("loglikelihood", ("To be, or not", " to be")), _req("loglikelihood", ("Now is", " the winter"))]
    a = lm_m.loglikelihood(reqs, disable_tqdm=True)
    b = lm_t.loglikelihood(reqs, disable_tqdm=True)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-3) and gx == gy

    class Bad:
        def logits(self, ids):
            return np.zeros((len(ids), 7), np.float32)

    with pytest.raises(RuntimeError, match="shape"):
        MobileMoELM(model=model, tokenizer=tok, engine="mobile", engine_obj=Bad()).loglikelihood(
            reqs, disable_tqdm=True)


def test_bad_engine_name_is_one_clear_error(model, tok):
    with pytest.raises(ValueError, match="engine='gpu'"):
        MobileMoELM(model=model, tokenizer=tok, engine="gpu")
