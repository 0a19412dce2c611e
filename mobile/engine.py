"""ctypes binding to the C engine (mobile/build/libmmoe.so): `mobile.Engine`. No torch import here.

    eng = Engine("model.mmoe", threads=2)
    logits = eng.eval([1, 2, 3])                 # last-token logits (numpy float32, vocab_size)
    out = eng.generate("To be", max_new_tokens=32, greedy=True)
    out.text, out.ids, out.prefill_tok_s, out.decode_tok_s, eng.profile()
    eng.expert_counts()                          # per MoE layer: (token, k) slots each expert received
    Engine("L.mmoe", mem_budget_mb=600)          # routed experts stay in the file, read into an expert cache
    eng.cache_stats()                            # hits, misses, bytes read, slots a layer, ... (budget runs)

The library is looked up at $MMOE_LIB, else mobile/build/libmmoe.so (built by `make mobile`).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobile.format import HEADER_SIZE, LAYER_MOE, read_header

TIMERS = ("attention", "router", "experts", "shared", "lm_head", "other")
# mmoe.h MMOE_CS_* order
CACHE_STATS = ("hits", "misses", "evictions", "bytes_read", "read_ns", "stall_ns", "slots_per_layer", "slot_bytes",
               "moe_layers", "policy", "direct_io", "io_threads", "budget", "min_budget", "resident_bytes", "prefetch",
               "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled")
CACHE_POLICIES = ("lru", "lfu", "pin")  # mmoe.h MMOE_CACHE_* order
DEFAULT_CACHE_POLICY = "lfu"  # best hit rate measured (bench/results/streaming.md; mobile/README.md)
MiB = 1 << 20
_LIB = None


def default_lib_path() -> Path:
    env = os.environ.get("MMOE_LIB")
    return Path(env) if env else Path(__file__).resolve().parent / "build" / "libmmoe.so"


def load_lib(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    global _LIB
    if _LIB is not None and path is None:
        return _LIB
    p = Path(path) if path else default_lib_path()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the C engine is not built (run `make mobile`)")
    lib = ctypes.CDLL(str(p))
    c_p, c_i, c_sz, c_f = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_float
    sigs = {
        "mmoe_model_open": (c_p, [ctypes.c_char_p, ctypes.c_char_p, c_sz]),
        "mmoe_model_close": (None, [c_p]),
        "mmoe_model_info": (ctypes.c_int64, [c_p, ctypes.c_char_p]),
        "mmoe_ctx_new": (c_p, [c_p, c_i, c_i, c_i, ctypes.c_char_p, c_sz]),
        "mmoe_ctx_free": (None, [c_p]),
        "mmoe_ctx_reset": (None, [c_p]),
        "mmoe_ctx_pos": (c_i, [c_p]),
        "mmoe_ctx_kernels": (ctypes.c_char_p, [c_p]),
        "mmoe_eval": (c_i, [c_p, c_p, c_i, c_p, c_i, ctypes.c_char_p, c_sz]),
        "mmoe_profile_get": (None, [c_p, c_p]),
        "mmoe_profile_reset": (None, [c_p]),
        "mmoe_expert_counts": (None, [c_p, c_p]),
        "mmoe_expert_counts_reset": (None, [c_p]),
        "mmoe_model_open_streaming": (c_p, [ctypes.c_char_p, ctypes.c_char_p, c_sz]),
        "mmoe_min_budget": (ctypes.c_int64, [c_p, c_i, c_i, c_i]),
        "mmoe_ctx_new_streaming": (c_p, [c_p, c_i, c_i, c_i, ctypes.c_uint64, c_i, c_i, ctypes.c_char_p, c_sz]),
        "mmoe_cache_stats": (c_i, [c_p, c_p]),
        "mmoe_cache_stats_reset": (None, [c_p]),
        "mmoe_ctx_set_prefetch": (c_i, [c_p, c_i]),
        "mmoe_tokenize": (c_i, [c_p, ctypes.c_char_p, c_sz, c_p, c_i]),
        "mmoe_token_bytes": (c_i, [c_p, ctypes.c_int32, ctypes.c_char_p, c_i]),
        "mmoe_token_is_stop": (c_i, [c_p, ctypes.c_int32]),
        "mmoe_rng_seed": (ctypes.c_uint64, [ctypes.c_uint64]),
        "mmoe_sample": (ctypes.c_int32, [c_p, c_i, c_f, c_f, ctypes.POINTER(ctypes.c_uint64)]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if path is None:
        _LIB = lib
    return lib


def validate_file(path: str | os.PathLike, lib: str | os.PathLike | None = None) -> None:
    """Check a .mmoe file with the C loader (mmoe_model_open: every header field, the tensor table, every
    tensor's range, the tokenizer), the same rules `generate` and mmoe-run apply, without building a context.
    Raises ValueError with the loader's one-line message (it names the file), FileNotFoundError when the
    library is not built."""
    try:
        lb = load_lib(lib)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot validate {path}: {e}") from None
    err = ctypes.create_string_buffer(512)
    m = lb.mmoe_model_open(os.fsencode(path), err, len(err))
    if not m:
        raise ValueError(err.value.decode(errors="replace"))
    lb.mmoe_model_close(m)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def routing_stats(counts: list[np.ndarray]) -> dict:
    """Summary of Engine.expert_counts(): distinct experts each layer used (min / median over layers) and each
    layer's max / mean expert load (median and worst over layers; 1.0 is perfect balance)."""
    if not counts:
        return {}
    distinct = np.array([int((c > 0).sum()) for c in counts])
    load = np.array([c.max() / c.mean() if c.sum() else 0.0 for c in counts])
    return dict(n_experts=len(counts[0]), layers=len(counts), distinct=distinct.tolist(),
                distinct_min=int(distinct.min()), distinct_median=float(np.median(distinct)),
                load_max_mean=load.tolist(), load_median=float(np.median(load)), load_worst=float(load.max()))


@dataclass
class Generation:
    ids: list[int]
    text: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    profile: dict = field(default_factory=dict)
    expert_counts: list = field(default_factory=list)  # Engine.expert_counts() of this generation
    cache_stats: dict = field(default_factory=dict)  # Engine.cache_stats() of this generation ({}: no budget)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("inf")


class Engine:
    """One model + one context (KV cache, thread pool). Not thread-safe; close() or use as a context manager.

    mem_budget_mb (MiB, as the peak-RSS figures): run within that peak RSS of this whole process (Python's own
    memory at open included, see mmoe.h): every tensor except the routed experts is read into memory, the
    experts are read from the file on demand into an expert cache (cache_policy "lru", "lfu" or "pin";
    io_threads read threads) sized from what the budget leaves. Outputs are bit-identical to the default
    (everything mmapped). A budget below the minimum raises ValueError naming both. prefetch=True (needs a
    budget): each decode step reads the next MoE layer's guessed experts (its router on the current hidden
    state) while this layer computes; outputs unchanged, counted in cache_stats()."""

    def __init__(self, path: str | os.PathLike, threads: int = 1, max_ctx: int = 0, float_path: bool = False,
                 lib: str | os.PathLike | None = None, mem_budget_mb: float | None = None,
                 cache_policy: str = DEFAULT_CACHE_POLICY, io_threads: int = 2, prefetch: bool = False):
        self.lib = load_lib(lib)
        err = ctypes.create_string_buffer(512)
        stream = mem_budget_mb is not None
        if stream:
            mb = float(mem_budget_mb)
            if not (mb > 0 and mb < 2**40):  # NaN fails both
                raise ValueError(f"mem_budget_mb must be a finite number > 0, got {mem_budget_mb!r}")
            if cache_policy not in CACHE_POLICIES:
                raise ValueError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {cache_policy!r}")
            if not 1 <= int(io_threads) <= 16:
                raise ValueError(f"io_threads must be in [1, 16], got {io_threads!r}")
        elif prefetch:
            raise ValueError("prefetch fills the expert cache of a memory budget: give mem_budget_mb too")
        opener = self.lib.mmoe_model_open_streaming if stream else self.lib.mmoe_model_open
        self._m = opener(os.fsencode(path), err, len(err))
        if not self._m:
            raise ValueError(err.value.decode(errors="replace"))
        if stream:
            self._c = self.lib.mmoe_ctx_new_streaming(self._m, int(threads), int(max_ctx), 1 if float_path else 0,
                                                      int(mb * MiB), CACHE_POLICIES.index(cache_policy),
                                                      int(io_threads), err, len(err))
        else:
            self._c = self.lib.mmoe_ctx_new(self._m, int(threads), int(max_ctx), 1 if float_path else 0, err,
                                            len(err))
        if not self._c:
            self.lib.mmoe_model_close(self._m)
            self._m = None
            raise ValueError(err.value.decode(errors="replace"))
        if stream and prefetch:
            self.lib.mmoe_ctx_set_prefetch(self._c, 1)
        self.threads = int(threads)
        self.vocab_size = self.info("vocab_size")
        self.eos_id = self.info("eos_id")
        self.max_ctx = int(max_ctx) if 0 < max_ctx <= self.info("max_seq_len") else self.info("max_seq_len")
        self.kernels = self.lib.mmoe_ctx_kernels(self._c).decode()
        self.n_layers, self.n_experts = self.info("n_layers"), self.info("n_experts")
        with open(path, "rb") as f:  # the loader validated the header: which layers route
            kinds = read_header(f.read(HEADER_SIZE))["layer_kinds"]
        self.moe_layers = [i for i, k in enumerate(kinds) if k == LAYER_MOE] if self.n_experts > 0 else []

    def info(self, key: str) -> int:
        return int(self.lib.mmoe_model_info(self._m, key.encode()))

    def close(self) -> None:
        if getattr(self, "_c", None):
            self.lib.mmoe_ctx_free(self._c)
            self._c = None
        if getattr(self, "_m", None):
            self.lib.mmoe_model_close(self._m)
            self._m = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    # ---- tokenizer ----
    def tokenize(self, text: str | bytes) -> list[int]:
        """The tokenizer is byte-level: bytes go in unchanged; str is UTF-8 (surrogateescape: a str from argv
        holding invalid UTF-8 gives back its original bytes)."""
        b = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogateescape")
        out = np.zeros(len(b) + 1, dtype=np.int32)
        n = self.lib.mmoe_tokenize(self._m, b, len(b), _ptr(out), len(out))
        if n < 0:
            raise ValueError("text cannot be tokenized (a byte is missing from the vocabulary)")
        return out[:n].tolist()

    def token_bytes(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.mmoe_token_bytes(self._m, int(tok), buf, len(buf))
        if n < 0:
            raise ValueError(f"token id {tok} out of range")
        return buf.raw[:n]

    def is_stop(self, tok: int) -> bool:
        """True for the end-of-text / end-of-turn tokens the exporter flagged (generation stops there)."""
        return bool(self.lib.mmoe_token_is_stop(self._m, int(tok)))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    # ---- forward ----
    @property
    def pos(self) -> int:
        return int(self.lib.mmoe_ctx_pos(self._c))

    def reset(self) -> None:
        self.lib.mmoe_ctx_reset(self._c)

    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Run ids after the cached tokens; returns (V,) last-token logits or (n, V) with all_logits."""
        a = np.ascontiguousarray(ids, dtype=np.int32)
        n = len(a)
        out = np.empty((n if all_logits else 1, self.vocab_size), dtype=np.float32)
        err = ctypes.create_string_buffer(512)
        if self.lib.mmoe_eval(self._c, _ptr(a), n, _ptr(out), 1 if all_logits else 0, err, len(err)) != 0:
            raise ValueError(err.value.decode(errors="replace"))
        return out if all_logits else out[0]

    def profile(self) -> dict[str, float]:
        s = np.zeros(len(TIMERS), dtype=np.float64)
        self.lib.mmoe_profile_get(self._c, _ptr(s))
        return dict(zip(TIMERS, s.tolist()))

    def profile_reset(self) -> None:
        self.lib.mmoe_profile_reset(self._c)

    def expert_counts(self) -> list[np.ndarray]:
        """Routing since the last expert_counts_reset (prefill and decode; reset() keeps them): one (n_experts,)
        int64 array per MoE layer (self.moe_layers), entry e = the (token, k) slots routed to expert e."""
        if not self.moe_layers:
            return []
        a = np.zeros(self.n_layers * self.n_experts, dtype=np.uint64)
        self.lib.mmoe_expert_counts(self._c, _ptr(a))
        a = a.reshape(self.n_layers, self.n_experts).astype(np.int64)
        return [a[i] for i in self.moe_layers]

    def expert_counts_reset(self) -> None:
        self.lib.mmoe_expert_counts_reset(self._c)

    def cache_stats(self) -> dict:
        """The expert cache's figures since the last cache_stats_reset (generate resets them): hits / misses
        count (MoE layer, forward step, selected expert) uses, plus hit_rate, evictions, bytes_read, read_s (I/O
        thread time), stall_s (compute waiting for reads), slots_per_layer, policy, direct_io, budget_mb,
        min_budget_mb, resident_mb; prefetch (on/off), prefetch_issued / _used / _wasted / _cancelled and
        prefetch_accuracy (used / issued). {} without a memory budget."""
        a = np.zeros(len(CACHE_STATS), dtype=np.uint64)
        if self.lib.mmoe_cache_stats(self._c, _ptr(a)) != 0:
            return {}
        d = {k: int(v) for k, v in zip(CACHE_STATS, a.tolist())}
        uses = d["hits"] + d["misses"]
        d["hit_rate"] = d["hits"] / uses if uses else 0.0
        d["policy"] = CACHE_POLICIES[d["policy"]]
        d["direct_io"] = bool(d["direct_io"])
        d["prefetch"] = bool(d["prefetch"])
        d["prefetch_accuracy"] = d["prefetch_used"] / d["prefetch_issued"] if d["prefetch_issued"] else 0.0
        d["read_s"], d["stall_s"] = d.pop("read_ns") * 1e-9, d.pop("stall_ns") * 1e-9
        for k in ("budget", "min_budget", "resident_bytes"):
            d[k.replace("_bytes", "") + "_mb"] = d.pop(k) / MiB
        return d

    def cache_stats_reset(self) -> None:
        self.lib.mmoe_cache_stats_reset(self._c)

    def min_budget_mb(self, threads: int | None = None, max_ctx: int | None = None, io_threads: int = 2) -> float:
        """The smallest mem_budget_mb a context of this (streaming) model accepts."""
        t = threads if threads is not None else self.threads
        c = max_ctx if max_ctx is not None else self.max_ctx
        return int(self.lib.mmoe_min_budget(self._m, int(t), int(c), int(io_threads))) / MiB

    def sample(self, logits: np.ndarray, temperature: float, top_p: float, rng: ctypes.c_uint64) -> int:
        lg = np.ascontiguousarray(logits, dtype=np.float32)
        return int(self.lib.mmoe_sample(_ptr(lg), len(lg), float(temperature), float(top_p), ctypes.byref(rng)))

    def generate(self, prompt: str | bytes | list[int], max_new_tokens: int, greedy: bool = False, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, stop_at_eos: bool = True) -> Generation:
        """Fresh context: prefill the prompt as one batch, then decode one token at a time."""
        ids = self.tokenize(prompt) if isinstance(prompt, (str, bytes)) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        self.reset()
        self.profile_reset()
        self.expert_counts_reset()
        self.cache_stats_reset()
        rng = ctypes.c_uint64(self.lib.mmoe_rng_seed(seed))
        temp = 0.0 if greedy else temperature
        t0 = time.perf_counter()
        logits = self.eval(ids)
        prefill_s = time.perf_counter() - t0
        out: list[int] = []
        decode_s, n_dec = 0.0, 0
        while len(out) < max_new_tokens:
            tok = self.sample(logits, temp, top_p, rng)
            out.append(tok)
            if (stop_at_eos and self.is_stop(tok)) or len(out) == max_new_tokens or self.pos >= self.max_ctx:
                break
            t0 = time.perf_counter()
            logits = self.eval([tok])
            decode_s += time.perf_counter() - t0
            n_dec += 1
        return Generation(ids=out, text=self.decode(out), prompt_tokens=len(ids), prefill_s=prefill_s,
                          decode_s=decode_s, decode_tokens=n_dec, profile=self.profile(),
                          expert_counts=self.expert_counts(), cache_stats=self.cache_stats())
