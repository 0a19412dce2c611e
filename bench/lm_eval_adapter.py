"""The `mobilemoe` model for lm-eval: score MobileMoE checkpoints with the harness the field uses.

Two engines behind one adapter, so float, fake-quant and the shipped INT4 engine are scored by the same code:

    engine=torch            the PyTorch model as saved (a QAT checkpoint runs with its INT4/int8 fake quant on)
    engine=torch-float      the same weights with fake quant off (the float reference)
    engine=torch-fakequant  fake quant forced on (PTQ view of a float checkpoint)
    engine=mobile           the INT4 C phone engine through its Python binding (mobile.Engine): the weights and
                            arithmetic that ship; needs `engine.logits(token_ids) -> (T, V) float32`

    python -m bench.eval ...                                   (the project CLI, `make eval`)
    import bench.lm_eval_adapter, lm_eval                      (from Python: the import registers the model)
    lm_eval.simple_evaluate(model="mobilemoe", model_args="ckpt=runs/tiny/final,engine=mobile", tasks=[...])

Tokenization is always done here in Python with the checkpoint's tokenizer.json (raw bytes when absent), so
every engine sees identical token ids and only the compute path differs.

lm-eval semantics implemented (and tested in tests/test_eval_adapter.py):
  loglikelihood(context, continuation) = sum of log p(continuation tokens | context) from ONE forward over
      context+continuation (left-truncated to the model's max length), is_greedy = every continuation token
      is the argmax; an empty context conditions on the prefix token (EOS, or "\\n" for a byte tokenizer).
  loglikelihood_rolling(text) = sum of log p over every token of text, via lm-eval's disjoint rolling
      windows of the max length, prefixed by the prefix token: for a text that fits, the full-sequence NLL.
  generate_until(context, {until, max_gen_toks}) = greedy decoding that stops at EOS, at max_gen_toks, or at
      the first occurrence of any stop string (the returned text is cut before it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger("mobilemoe.eval")

ENGINES = ("torch", "torch-float", "torch-fakequant", "mobile")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")
BYTE_PREFIX_ID = 10  # "\n": the conditioning token for empty contexts when a byte tokenizer has no EOS


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
class ByteTokenizer:
    """The model-directory convention when tokenizer.json is absent: token i is byte i (utf-8)."""

    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer (the byte-level BPE that train/ writes as tokenizer.json)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        from tokenizers import Tokenizer  # noqa: PLC0415

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on bad json)
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(model_dir: str | os.PathLike | None):
    t = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
    return HFTokenizer.from_file(t) if t is not None and t.is_file() else ByteTokenizer()


# ----------------------------------------------------------------------------------------------------------
# Engines: each maps a batch of token sequences to per-position log-probabilities (T_i, V) float64 arrays.
class TorchEngine:
    def __init__(self, model, batch_size: int = 16, qat: bool | None = None):
        self.model = model.eval()
        if qat is not None:
            self.model.set_qat(qat)
        self.batch_size = max(1, int(batch_size))
        self.max_length = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        self.name = "torch-fakequant" if self.model.qat else "torch-float"

    @torch.no_grad()
    def logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Right-padded batches: the model is causal and routing is per token (dropless, no capacity), so the
        padding after a sequence cannot change its logits."""
        dev = self.model.tok_emb.weight.device
        out: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            T = len(seqs[idx[0]])
            x = torch.zeros(len(idx), T, dtype=torch.long, device=dev)
            for r, i in enumerate(idx):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            lp = F.log_softmax(self.model(x).double(), dim=-1).cpu().numpy()
            for r, i in enumerate(idx):
                out[i] = lp[r, :len(seqs[i])]
        return out


class MobileEngine:
    """The INT4 phone engine (mobile.Engine, ctypes) scoring one sequence per call."""

    name = "mobile"

    def __init__(self, engine, max_length: int, vocab_size: int):
        if hasattr(engine, "logits"):
            self._logits = engine.logits
        elif hasattr(engine, "eval") and hasattr(engine, "reset"):  # mobile.Engine: fresh context, all positions
            self._logits = lambda ids: (engine.reset(), engine.eval(ids, all_logits=True))[1]
        else:
            raise TypeError("the mobile engine offers neither logits(token_ids) nor reset()+eval(ids, all_logits=True):"
                            " the eval adapter needs per-position logits (T, V) float32 for a token sequence")
        self.engine, self.max_length, self.vocab_size = engine, max_length, vocab_size

    def logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        out = []
        for s in seqs:
            lg = np.asarray(self._logits(list(map(int, s))), dtype=np.float64)
            if lg.shape != (len(s), self.vocab_size):
                raise RuntimeError(f"mobile engine returned logits of shape {lg.shape}, "
                                   f"expected ({len(s)}, {self.vocab_size})")
            m = lg.max(axis=-1, keepdims=True)
            out.append(lg - m - np.log(np.exp(lg - m).sum(axis=-1, keepdims=True)))
        return out


def open_mobile_engine(ckpt: str | os.PathLike, mmoe: str | os.PathLike | None = None, threads: int | None = None):
    """mobile.Engine on `mmoe`, or on <ckpt>/model.mmoe exported from the checkpoint when missing/stale."""
    try:
        from mobile import Engine  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError(f"engine=mobile needs the phone engine's Python binding (mobile.Engine): {e}") from e
    def open_(p: Path):
        return Engine(str(p), threads=threads) if threads else Engine(str(p))

    if mmoe is not None:
        if not Path(mmoe).is_file():
            raise FileNotFoundError(f"{mmoe}: no such .mmoe file")
        return open_(Path(mmoe))
    from mobile.export import export_model_dir  # noqa: PLC0415

    path = Path(ckpt) / "model.mmoe"
    src = Path(ckpt) / "model.safetensors"
    if not path.is_file() or path.stat().st_mtime < src.stat().st_mtime:
        log.info("exporting %s -> %s", ckpt, path)
        export_model_dir(ckpt, path)
        return open_(path)
    try:
        return open_(path)
    except ValueError as e:  # a cached export from an older format version: export again once
        log.warning("re-exporting %s (%s)", path, e)
        export_model_dir(ckpt, path)
        return open_(path)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a run directory whose final model is <run>/final."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "final" / "config.json").is_file():
        return p / "final"
    raise FileNotFoundError(f"{p}: not a model directory (config.json + model.safetensors) nor a run directory "
                            f"with final/")


# ----------------------------------------------------------------------------------------------------------
@register_model("mobilemoe")
class MobileMoELM(TemplateLM):
    """lm-eval model `mobilemoe`. model_args: ckpt=<model or run dir>, engine=torch|torch-float|
    torch-fakequant|mobile, mmoe=<file.mmoe> (mobile; default <ckpt>/model.mmoe, exported when missing),
    threads=N (mobile), batch_size=N (torch), max_length=N (default: the model's max_seq_len).
    Tests may pass `model=` (a MobileMoE), `engine_obj=` (anything with .logits) and `tokenizer=` directly."""

    def __init__(self, ckpt: str | None = None, engine: str = "torch", mmoe: str | None = None,
                 threads: int | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 model=None, engine_obj=None, tokenizer=None, device: str = "cpu", **kwargs):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
        if kwargs:
            log.debug("mobilemoe: ignoring model args %s", sorted(kwargs))
        model_dir = resolve_model_dir(ckpt) if ckpt is not None else None
        if model is None and model_dir is not None:
            from model.io import load_model_dir  # noqa: PLC0415

            model, _ = load_model_dir(model_dir, device=device)
        if model is None:
            raise ValueError("mobilemoe: pass ckpt=<model directory> (or model= in Python)")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
        if engine == "mobile":
            if engine_obj is None:
                if model_dir is None:
                    raise ValueError("engine=mobile needs ckpt= (the .mmoe is exported from it) or engine_obj=")
                engine_obj = open_mobile_engine(model_dir, mmoe, int(threads) if threads else None)
            self.engine = MobileEngine(engine_obj, model.cfg.max_seq_len, model.cfg.vocab_size)
        else:
            qat = {"torch": None, "torch-float": False, "torch-fakequant": True}[engine]
            self.engine = TorchEngine(model, batch_size=bs, qat=qat)
        self.engine_name = self.engine.name
        self._max_length = int(max_length) if max_length else model.cfg.max_seq_len
        if self._max_length > model.cfg.max_seq_len:
            raise ValueError(f"max_length={self._max_length} exceeds the model's max_seq_len={model.cfg.max_seq_len}")

    # ---- lm-eval plumbing -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return BYTE_PREFIX_ID if eos is None else eos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- scoring ----------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation), greedy?) from one forward each."""
        seqs, n_conts = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("loglikelihood: empty continuation")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            seqs.append(full[:-1])  # position t predicts token t+1
            n_conts.append(min(len(cont), len(full) - 1))
        out = []
        for lp, (_, cont), n, s in zip(self.engine.logprobs(seqs), pairs, n_conts, seqs):
            tgt = np.asarray(cont[-n:], dtype=np.int64)
            rows = lp[len(s) - n:]
            out.append((float(rows[np.arange(n), tgt].sum()), bool((rows.argmax(-1) == tgt).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, chunk: int = 64):
        res = []
        for b in tqdm(range(0, len(requests), chunk), disable=disable_tqdm, desc=f"loglikelihood [{self.engine_name}]"):
            part = requests[b:b + chunk]
            scored = self._score([(c, x) for _, c, x in part])
            for (key, _, _), r in zip(part, scored):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, r)
            res.extend(scored)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc=f"loglikelihood_rolling [{self.engine_name}]"):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def greedy(self, ids: list[int], max_new: int, stop: Callable[[list[int]], int | None] | None = None) -> list[int]:
        """Greedy decoding (recompute per step; fine for eval sizes). `stop(generated)` returns a cut length
        to stop at, or None to continue."""
        gen: list[int] = []
        for _ in range(max_new):
            ctx = (ids + gen)[-self.max_length:]
            nxt = int(self.engine.logprobs([ctx])[0][-1].argmax())
            if self.tokenizer.eos_id is not None and nxt == self.tokenizer.eos_id:
                break
            gen.append(nxt)
            if stop is not None and stop(gen) is not None:
                break
        return gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc=f"generate_until [{self.engine_name}]"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                log.warning("generate_until: sampling requested (%s); the adapter decodes greedily", kw)
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]

            def first_stop(gen: list[int], until=until) -> int | None:
                text = self.tok_decode(gen)
                hits = [text.find(s) for s in until if s and s in text]
                return min(hits) if hits else None

            gen = self.greedy(ids, max_new, first_stop if until else None)
            text = self.tok_decode(gen)
            cut = first_stop(gen) if until else None
            if cut is not None:
                text = text[:cut]  # everything before the earliest stop string
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
