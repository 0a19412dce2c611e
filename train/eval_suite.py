"""The held-out evaluation run after every stage: loss on the `[eval] heldout` windows beside the unigram entropy of
the same tokens, and (from the SFT stage on, when `[eval] heldout_sft` is set) the response-only loss on
held-out chat pairs beside theirs."""

from __future__ import annotations

from train.batches import eval_pairs, eval_windows
from train.data_cache import DataCache
from train.loop import evaluate, unigram_entropy
from train.recipe_config import Recipe


def eval_suite(rec: Recipe, data: DataCache, mcfg, device, micro_batch: int):
    """-> eval_fn(model) giving heldout_loss, unigram (and sft_loss, sft_unigram when configured)."""
    ev = rec.eval
    T = ev.seq_len
    hx, hm = eval_windows(data.lm({"source": ev.heldout, "max_tokens": ev.max_tokens + 1}).long(), T, ev.max_tokens)
    uni = unigram_entropy(hx, hm, mcfg.vocab_size)
    sx = sm = None
    if ev.heldout_sft:
        d = data.sft({"source": ev.heldout_sft})
        sx, sm = eval_pairs([(i.tolist(), m.tolist()) for i, m in zip(d["ids"], d["masks"])], T,
                            data.eos)
        s_uni = unigram_entropy(sx, sm, mcfg.vocab_size)

    # held-out windows are scored with the attention pattern training used
    doc_eos = data.eos if rec.data.doc_mask else None

    def fn(model, sft: bool = True) -> dict:
        out = dict(heldout_loss=evaluate(model, hx, hm, micro_batch, device, doc_eos=doc_eos), unigram=uni)
        if sx is not None and sft:
            out.update(sft_loss=evaluate(model, sx, sm, micro_batch, device, doc_eos=doc_eos), sft_unigram=s_uni)
        return out

    return fn
