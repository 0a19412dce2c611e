"""The tokenizer side of the chat template: special-token ids and (ids, loss_mask) encoding for SFT.

The template itself (special-token strings, render_prompt, render) is model/chat_template.py, plain Python
so the phone-side CLI can use it without torch or tokenizers; it is re-exported here for train/ callers.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from model.chat_template import ASSISTANT, END, EOS, SPECIAL_TOKENS, USER, render, render_prompt

__all__ = ["ASSISTANT", "END", "EOS", "SPECIAL_TOKENS", "USER", "encode_chat", "encode_chat_batch", "render",
           "render_prompt", "special_ids"]


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing}")
    return ids


def encode_chat(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for one pair: mask 1 on the response and its closing <|end|>, 0 elsewhere.
    Prompt and response are encoded separately so the mask boundary is exact (the template puts a newline
    before the response, so no BPE merge can cross it)."""
    p_ids = tok.encode(render_prompt(prompt), add_special_tokens=False).ids
    r_ids = tok.encode(f"{response}{END}", add_special_tokens=False).ids
    nl = tok.encode("\n", add_special_tokens=False).ids
    return p_ids + r_ids + nl, [0] * len(p_ids) + [1] * len(r_ids) + [0] * len(nl)


def encode_chat_batch(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """encode_chat over many pairs (batched through the tokenizer's parallel encoder; same result)."""
    ps = tok.encode_batch([render_prompt(p) for p, _ in pairs], add_special_tokens=False)
    rs = tok.encode_batch([f"{r}{END}" for _, r in pairs], add_special_tokens=False)
    nl = tok.encode("\n", add_special_tokens=False).ids
    return [(p.ids + r.ids + nl, [0] * len(p.ids) + [1] * len(r.ids) + [0] * len(nl)) for p, r in zip(ps, rs)]
