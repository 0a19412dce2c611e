"""Deterministic batch streams over token sources.

The global batch of optimizer step s is a pure function of (seed, s): each row picks a source by the mixture
weights and then a row from that source, all from one torch.Generator seeded with (seed, s). So the "data
position" of a checkpoint is its step, a resumed run sees exactly the batches it would have seen, and every
rank can build the same global batch and take its own rows.

A row is (ids (T+1,), mask (T,)): ids[:-1] are inputs, ids[1:] targets, mask says which targets count.

train.loop asks each step for one rank's rows only (rank_batch -> RankBatch); get() is the whole global batch.
With document masking on (`[data] doc_mask = true`; doc_eos = the EOS id), a RankBatch also carries each input
token's document id (document_ids): the model then attends within documents only and restarts RoPE positions
at each one (model/model.py DocMask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankBatch:
    """One optimizer step's rows of one rank."""
    ids: torch.Tensor              # (R, T+1) int64: inputs ids[:, :-1], targets ids[:, 1:]
    mask: torch.Tensor             # (R, T) 0/1: which targets count
    n_targets: int                 # targets that count in the whole global batch (every rank): the loss normaliser
    doc: torch.Tensor | None = None  # (R, T) int64 document id of each input token; None: no document masking


def document_ids(inp_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int64: the number of EOS tokens before each token in its row (an EOS belongs to the document it
    ends, the token after it starts the next one): train/store.py's packing, on torch tensors."""
    is_eos = (inp_BT == eos_id).long()
    return is_eos.cumsum(1) - is_eos


def _split(B: int, rank: int, world: int) -> int:
    if world < 1 or not 0 <= rank < world or B % world:
        raise ValueError(f"rank {rank} of world {world}: the global batch {B} must split evenly")
    return B // world


class LMSource:
    """A 1-D token stream; a row is a random window (all targets count)."""

    def __init__(self, ids_1d: torch.Tensor):
        self.ids = ids_1d.long().contiguous()

    def row(self, g: torch.Generator, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.ids.numel()
        if n < T + 1:
            raise ValueError(f"token source has {n} tokens; a row needs {T + 1}")
        off = int(torch.randint(0, n - T, (1,), generator=g))
        return self.ids[off:off + T + 1], torch.ones(T, dtype=torch.long)


class SFTSource:
    """Prompt/response examples (ids, loss mask over the ids); a row packs randomly drawn examples end to end
    until T+1 tokens, keeping the loss mask on response tokens only."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        if not examples:
            raise ValueError("SFT source has no examples")
        self.ids = [torch.tensor(i, dtype=torch.long) for i, _ in examples]
        self.mask = [torch.tensor(m, dtype=torch.long) for _, m in examples]

    def row(self, g: torch.Generator, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, msk, n = [], [], 0
        while n < T + 1:
            j = int(torch.randint(0, len(self.ids), (1,), generator=g))
            ids.append(self.ids[j])
            msk.append(self.mask[j])
            n += self.ids[j].numel()
        ids_T1 = torch.cat(ids)[:T + 1]
        # mask over the ids -> mask over the targets ids[1:]
        return ids_T1, torch.cat(msk)[1:T + 1]


class Batcher:
    def __init__(self, sources: list, weights: list[float], seq_len: int, global_batch: int, seed: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError("Batcher: need one weight per source and at least one source")
        w = torch.tensor(weights, dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"Batcher: mixture weights must be >= 0 with a positive sum, got {weights}")
        self.sources, self.w = sources, w / w.sum()
        self.T, self.B, self.seed = seq_len, global_batch, seed
        self.doc_eos: int | None = None

    def set_doc_mask(self, on: bool, eos_id: int | None) -> None:
        """Document masking for rank_batch (off: doc is None, the batches exactly as before)."""
        if on and eos_id is None:
            raise ValueError("document masking needs the tokenizer's EOS id")
        self.doc_eos = int(eos_id) if on else None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        src = torch.multinomial(self.w, self.B, replacement=True, generator=g).tolist()
        rows = [self.sources[s].row(g, self.T) for s in src]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def rank_batch(self, step: int, rank: int = 0, world: int = 1) -> RankBatch:
        """Rows [rank*B/W, (rank+1)*B/W) of get(step), the same tensors, without holding the other ranks' rows:
        the draws are sequential in one generator (an SFT row's draws depend on its examples' lengths), so the
        others' rows are drawn (LMSource: a view, SFTSource: a short concatenation) and dropped, only their
        target counts kept for the global normaliser."""
        per = _split(self.B, rank, world)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        src = torch.multinomial(self.w, self.B, replacement=True, generator=g).tolist()
        lo, hi = rank * per, (rank + 1) * per
        ids, mask, n = [], [], 0
        for i, s in enumerate(src):
            x, m = self.sources[s].row(g, self.T)
            n += int(m.sum())
            if lo <= i < hi:
                ids.append(x)
                mask.append(m)
        ids_RT1 = torch.stack(ids)
        doc = None if self.doc_eos is None else document_ids(ids_RT1[:, :-1], self.doc_eos)
        return RankBatch(ids_RT1, torch.stack(mask), n, doc)


def eval_windows(ids_1d: torch.Tensor, T: int, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (T+1)-windows (stride T) over a held-out stream -> (ids (N, T+1), mask (N, T))."""
    ids = ids_1d.long()
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    n = (ids.numel() - 1) // T
    if n < 1:
        raise ValueError(f"held-out stream of {ids.numel()} tokens is shorter than one window of {T + 1}")
    x = torch.stack([ids[i * T: i * T + T + 1] for i in range(n)])
    return x, torch.ones(n, T, dtype=torch.long)


def eval_pairs(examples: list[tuple[list[int], list[int]]], T: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row, right-padded (padding masked out), truncated to T+1 tokens."""
    if not examples:
        raise ValueError("no held-out examples")
    x = torch.full((len(examples), T + 1), pad_id, dtype=torch.long)
    m = torch.zeros(len(examples), T, dtype=torch.long)
    for r, (ids, msk) in enumerate(examples):
        ids, msk = ids[:T + 1], msk[:T + 1]
        x[r, :len(ids)] = torch.tensor(ids)
        m[r, :len(ids) - 1] = torch.tensor(msk[1:])
    return x, m
