"""The two engines bench.mobile measures, behind one interface (reset / eval / profile / routing / close).

OursRunner drives our INT4 engine through mobile.engine.Engine (the ctypes binding `mobile generate` uses);
LlamaRunner drives llama.cpp through llama-cpp-python's low-level API. Both are used inside a worker process.
"""

from __future__ import annotations

from pathlib import Path

from mobile.engine import Engine, routing_stats

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "mobile" / "build" / "libmmoe.so"
ENGINES = ("ours", "llama.cpp")
MAX_CTX = 2048


class OursRunner:
    """Our engine through mobile.engine.Engine (the ctypes binding of mobile/c/mmoe.h that `mobile generate` uses)."""

    def __init__(self, path: str, threads: int):
        self.engine = Engine(path, threads=threads, max_ctx=MAX_CTX, lib=LIB)
        self.kernels = self.engine.kernels

    def reset(self) -> None:
        self.engine.reset()

    def eval(self, ids: list[int]) -> None:
        self.engine.eval(ids)

    def profile_reset(self) -> None:
        self.engine.profile_reset()

    def profile(self) -> dict[str, float]:
        return self.engine.profile()

    def routing_reset(self) -> None:
        self.engine.expert_counts_reset()

    def routing(self) -> dict:
        """mobile.engine.routing_stats of the evals since routing_reset ({} for a model without MoE layers)."""
        return routing_stats(self.engine.expert_counts())

    def close(self) -> None:
        self.engine.close()


class LlamaRunner:
    """llama.cpp through llama-cpp-python's low-level API (no Python-side logits copies or score arrays)."""

    def __init__(self, path: str, threads: int):
        import llama_cpp as L  # noqa: PLC0415

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = MAX_CTX, 512, 512
        cp.n_threads, cp.n_threads_batch = threads, threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(512, 0, 1)
        self.kernels = L.llama_print_system_info().decode() if hasattr(L, "llama_print_system_info") else ""
        self.pos = 0

    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.pos = 0

    def eval(self, ids: list[int]) -> None:
        L, b = self.L, self.batch
        for s in range(0, len(ids), 512):  # n_batch = 512: longer prompts go in 512-token chunks
            chunk = ids[s:s + 512]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = self.pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = i == len(chunk) - 1
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            L.llama_synchronize(self.ctx)
            self.pos += len(chunk)

    def profile_reset(self) -> None:
        pass

    def profile(self) -> dict[str, float]:
        return {}

    # llama.cpp exposes no per-expert routing counters: the routing table reports our engine only
    def routing_reset(self) -> None:
        pass

    def routing(self) -> dict:
        return {}

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)
