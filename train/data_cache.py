"""The in-memory data path of a run: each `[[stages.data]]` source tokenized once (cached under <run>/cache),
as LM token streams or SFT (ids, loss mask) pairs, and a stage's batch stream: train/store.py's StoreMixture when
its sources are token stores (prepared, or built in the run by train/data_plan.py), else the in-memory Batcher
(train/batches.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from train import data_plan
from train import store as tstore
from train.batches import Batcher, LMSource, SFTSource
from train.chat import SPECIAL_TOKENS, encode_chat_batch
from train.data import DataError, iter_source, quality_text, shakespeare_splits
from train.loop import StageConfig, dist_info
from train.recipe_config import Recipe


class DataCache:
    """Tokenized sources, built once per run (and cached on disk under <run>/cache)."""

    def __init__(self, rec: Recipe, run: Path, tok, root: str):
        self.rec, self.run, self.tok, self.root = rec, run, tok, root
        self.eos = tok.token_to_id(SPECIAL_TOKENS[0])
        self.mem: dict = {}
        self._splits = None

    def splits(self):
        if self._splits is None:
            self._splits = shakespeare_splits(self.root)
        return self._splits

    def _cached(self, key: str, build):
        if key in self.mem:
            return self.mem[key]
        f = self.run / "cache" / (key.replace(":", "_").replace("/", "_") + ".pt")
        if f.is_file():
            try:
                v = torch.load(f, weights_only=True)
                self.mem[key] = v
                return v
            except Exception:  # noqa: BLE001  (a corrupt cache is rebuilt)
                pass
        v = build()
        if dist_info()[0] == 0:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
            torch.save(v, tmp)
            os.replace(tmp, f)
        self.mem[key] = v
        return v

    def _enc(self, texts: list[str]) -> torch.Tensor:
        out: list[int] = []
        for e in self.tok.encode_batch(texts, add_special_tokens=False):
            out.extend(e.ids)
            out.append(self.eos)
        return torch.tensor(out, dtype=torch.int32)

    def _pairs(self, pairs):
        enc = encode_chat_batch(self.tok, pairs)
        return dict(ids=[torch.tensor(i, dtype=torch.int32) for i, _ in enc],
                    masks=[torch.tensor(m, dtype=torch.int8) for _, m in enc])

    def lm(self, spec: dict) -> torch.Tensor:
        src = spec["source"]
        if src == "shakespeare:train":
            return self._cached(src, lambda: self._enc(self.splits()[0]))
        if src == "shakespeare:heldout":
            return self._cached(src, lambda: self._enc(self.splits()[1]))
        if src == "shakespeare:quality":
            return self._cached(src, lambda: self._enc([q for q in map(quality_text, self.splits()[0]) if q]))
        limit = int(spec.get("max_tokens", 50_000_000))
        if tstore.is_store(src):  # already tokenized on disk: read the first `limit` tokens, no cache copy
            ts = tstore.open_stores([src], self.tok)[0]
            return torch.from_numpy(ts.read(0, min(ts.n_tokens, limit)).astype("int64"))

        def build():
            st: dict = {}
            out: list[int] = []
            for doc in iter_source(src, spec.get("text_field", "text"), spec.get("split", "train"), st):
                out.extend(self.tok.encode(doc, add_special_tokens=False).ids)
                out.append(self.eos)
                if len(out) >= limit:
                    break
            if st.get("skipped"):
                print(f"data {src}: skipped {st['skipped']} malformed rows (kept {st['rows']})", file=sys.stderr)
            if len(out) < 2:
                raise DataError(f"data {src}: no usable text rows")
            return torch.tensor(out, dtype=torch.int32)

        return self._cached(f"{src}:{spec.get('text_field', 'text')}", build)

    def sft(self, spec: dict) -> dict:
        from train.sft import build_pairs  # noqa: PLC0415

        src = spec["source"]
        if src == "shakespeare:sft":
            return self._cached(src, lambda: self._pairs(build_pairs(self.splits()[0], seed=0)))
        if src == "shakespeare:sft_heldout":
            return self._cached(src, lambda: self._pairs(build_pairs(self.splits()[1], seed=0, max_pairs_per_play=60)))
        limit = int(spec.get("max_rows", 200_000))

        def build():
            st: dict = {}
            pairs = []
            for row in iter_source(src, spec.get("text_field", "messages"), spec.get("split", "train"), st,
                                   raw=True):
                pr = chat_pair(row)
                if pr is None:
                    st["skipped"] += 1
                    continue
                pairs.append(pr)
                if len(pairs) >= limit:
                    break
            if st.get("skipped"):
                print(f"data {src}: skipped {st['skipped']} malformed rows (kept {len(pairs)})", file=sys.stderr)
            if not pairs:
                raise DataError(f"data {src}: no usable prompt/response rows")
            return self._pairs(pairs)

        return self._cached(f"{src}:sft", build)

    def batcher(self, mix, st: StageConfig, seed: int):
        """A stage's batch stream: train/store.py's StoreMixture when its sources are token stores (each rank
        reads only its own rows, nothing held in memory), else the in-memory Batcher."""
        srcs = [d.source for d in mix]
        rank, world = dist_info()
        if data_plan.reads_run_stores(self.rec, st.name):  # [data] build_stores: <run>/store, built once
            m = data_plan.mixture(self.rec, st, self.run, self.tok, self.root, seed, rank, world)
            if rank == 0:
                for line in data_plan.plan_lines(self.rec, st, self.run):
                    print(f"[{st.name}] {line}", file=sys.stderr)
            return m
        if tstore.stage_uses_stores(srcs, [d.is_chat for d in mix], st.name):
            rank, world = dist_info()
            return tstore.StoreMixture(tstore.open_stores(srcs, self.tok), [d.mix_weight for d in mix], st.seq_len,
                                       st.global_batch, seed, names=srcs, rank=rank, world=world)
        return Batcher([self.source(d.as_dict()) for d in mix], [d.mix_weight for d in mix], st.seq_len,
                       st.global_batch, seed)

    def source(self, spec: dict):
        is_chat = spec["source"] in ("shakespeare:sft", "shakespeare:sft_heldout") or spec.get("format") == "chat"
        if is_chat:
            d = self.sft(spec)
            return SFTSource([(i.tolist(), m.tolist()) for i, m in zip(d["ids"], d["masks"])])
        return LMSource(self.lm(spec).long())


def chat_pair(row) -> tuple[str, str] | None:
    """A prompt/response pair from a chat row: {"messages": [{"role", "content"}...]} (first user turn and the
    assistant reply after it) or {"prompt", "response"}. None = malformed."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return row["prompt"], row["response"]
    msgs = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(msgs, list):
        return None
    for a, b in zip(msgs, msgs[1:]):
        if (isinstance(a, dict) and isinstance(b, dict) and a.get("role") == "user" and b.get("role") == "assistant"
                and isinstance(a.get("content"), str) and isinstance(b.get("content"), str)):
            return a["content"], b["content"]
    return None
