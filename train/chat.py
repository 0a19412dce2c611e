"""The chat template and special tokens: the ONE definition that train/, eval and the phone engine use.

Special tokens (ids 0..3 in every tokenizer the embedded default trains, in this order):
    <|endoftext|>   0   document separator in pre-training; generation also stops on it
    <|user|>        1   starts a user turn
    <|assistant|>   2   starts an assistant turn
    <|end|>         3   ends a turn (the assistant's <|end|> is the stop token)

A single-turn conversation renders as (newlines literal):

    <|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>\\n

and a generation prompt is everything up to and including "<|assistant|>\\n". In SFT the loss covers the
response tokens and the closing <|end|> only (the model must learn to stop), never the prompt.
"""

from __future__ import annotations

from tokenizers import Tokenizer

EOS = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = (EOS, USER, ASSISTANT, END)


def render_prompt(prompt: str) -> str:
    """The generation prompt for one user message."""
    return f"{USER}\n{prompt}{END}\n{ASSISTANT}\n"


def render(prompt: str, response: str) -> str:
    return f"{render_prompt(prompt)}{response}{END}\n"


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
