"""The chat template and special tokens: the ONE definition that train/, eval and the phone engine use.

Plain Python on purpose (no torch, no tokenizers): the phone-side CLI (`python -m mobile generate --chat`)
imports it, and the runtime side of mobile/ must run where neither is installed. The tokenizer-facing
helpers (special_ids, encode_chat) live in train/chat.py.

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
