/* MobileMoE phone engine: public C API (used by mmoe-run, the fuzz driver and the Python ctypes binding).
 * Every function that can fail returns a negative value / NULL and writes a one-line message into err. */
#ifndef MMOE_H
#define MMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mmoe_model mmoe_model;
typedef struct mmoe_ctx mmoe_ctx;

/* Open a .mmoe file (mmap read-only) and validate every field before use. */
mmoe_model *mmoe_model_open(const char *path, char *err, size_t errlen);
/* Same validation on a caller-owned buffer (kept alive by the caller until close); fuzzing uses it. */
mmoe_model *mmoe_model_from_buffer(const void *buf, size_t size, char *err, size_t errlen);
void mmoe_model_close(mmoe_model *m);
/* Open for running under a memory budget: the same validation, then every byte outside the routed-expert
 * tensors is read into memory (pread; the mapping is dropped) and the experts stay in the file, read on demand
 * by the context's expert cache (mmoe_ctx_new_streaming). MMOE_NO_DIRECT=1 in the environment disables
 * O_DIRECT (plain pread + posix_fadvise(DONTNEED) is the fallback anyway where the filesystem refuses it). */
mmoe_model *mmoe_model_open_streaming(const char *path, char *err, size_t errlen);

/* Config as the engine sees it: keys "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
 * "n_experts", "top_k", "max_seq_len", "eos_id", "tok_vocab"; -1 for an unknown key. */
int64_t mmoe_model_info(const mmoe_model *m, const char *key);

enum { MMOE_FLOAT_PATH = 1 }; /* ctx flag: dequantized fp32 weights x fake-quantized activations (debug) */

/* n_threads >= 1; max_ctx <= 0 means the model's max_seq_len. */
mmoe_ctx *mmoe_ctx_new(const mmoe_model *m, int n_threads, int max_ctx, int flags, char *err, size_t errlen);
void mmoe_ctx_free(mmoe_ctx *c);
void mmoe_ctx_reset(mmoe_ctx *c);          /* empty the KV cache */
int mmoe_ctx_pos(const mmoe_ctx *c);       /* tokens in the KV cache */
const char *mmoe_ctx_kernels(const mmoe_ctx *c);

/* ---- running under a memory budget (a model opened with mmoe_model_open_streaming) ----------------------
 * The budget bounds this process's peak RSS (VmHWM): the process as it was when the model had been opened
 * (mmoe_model_open_streaming measures its VmRSS, resident weights included) + the context's buffers (KV
 * cache, activations) + the expert cache's tables and slots + a fixed allowance for thread stacks and the
 * caller's logits. Memory the caller allocates later is its own. What is left after the rest becomes expert
 * slots, the same number for every MoE layer (at most n_experts); the minimum is top_k slots a layer.
 * Outputs are bit-identical to the all-resident engine whatever the budget or policy. */
enum { MMOE_CACHE_LRU = 0, MMOE_CACHE_LFU = 1, MMOE_CACHE_PIN = 2 };
extern const char *const mmoe_cache_policy_names[3]; /* "lru", "lfu", "pin" */
#define MMOE_IO_THREADS_DEFAULT 2
/* The smallest budget (bytes) a context of these parameters accepts; io_threads <= 0: the default. */
int64_t mmoe_min_budget(const mmoe_model *m, int n_threads, int max_ctx, int io_threads);
/* As mmoe_ctx_new plus the expert cache. A budget below mmoe_min_budget fails (err names both figures). */
mmoe_ctx *mmoe_ctx_new_streaming(const mmoe_model *m, int n_threads, int max_ctx, int flags, uint64_t mem_budget,
                                 int policy, int io_threads, char *err, size_t errlen);
/* Expert-cache figures (hits / misses count (layer, step, selected expert) uses; counters since the last
 * reset): out has MMOE_CS_COUNT entries. Returns -1 (nothing written) for a context without a cache. */
enum { MMOE_CS_HITS, MMOE_CS_MISSES, MMOE_CS_EVICTIONS, MMOE_CS_BYTES_READ, MMOE_CS_READ_NS, MMOE_CS_STALL_NS,
       MMOE_CS_SLOTS_PER_LAYER, MMOE_CS_SLOT_BYTES, MMOE_CS_MOE_LAYERS, MMOE_CS_POLICY, MMOE_CS_DIRECT_IO,
       MMOE_CS_IO_THREADS, MMOE_CS_BUDGET, MMOE_CS_MIN_BUDGET, MMOE_CS_RESIDENT, MMOE_CS_PREFETCH,
       MMOE_CS_PF_ISSUED, MMOE_CS_PF_USED, MMOE_CS_PF_WASTED, MMOE_CS_PF_CANCELLED, MMOE_CS_COUNT };
extern const char *const mmoe_cache_stat_names[MMOE_CS_COUNT];
int mmoe_cache_stats(const mmoe_ctx *c, uint64_t *out);
void mmoe_cache_stats_reset(mmoe_ctx *c); /* counters only: the cached experts stay */
/* Next-layer prefetch for decode steps (off by default): after a MoE layer's routing, the next MoE layer's
 * router is applied to the current hidden state (normed with that layer's ffn norm; the residual still
 * changes, so it is a guess) and its guessed top-k experts that are not cached are read into that layer's
 * slots while this layer computes. Outputs are unchanged (the real routing decides what is computed); no
 * memory beyond the budget. prefetch_issued counts reads completed, prefetch_used those the routing then
 * selected before eviction, prefetch_wasted those evicted unselected, prefetch_cancelled those the next
 * layer began before any I/O thread started (never read). Returns -1 for a context without a cache. */
int mmoe_ctx_set_prefetch(mmoe_ctx *c, int on);

/* Run n tokens (a prompt as a batch, or one token) after the cached ones. Writes logits of the last token
 * (vocab_size floats) or, if all_logits, of every token (n * vocab_size). Returns 0, or -1 with err set. */
int mmoe_eval(mmoe_ctx *c, const int32_t *ids, int n, float *logits, int all_logits, char *err, size_t errlen);

/* Per-op wall-clock seconds since the last reset: attention, router, experts, shared, lm_head, other. */
enum { MMOE_T_ATTENTION, MMOE_T_ROUTER, MMOE_T_EXPERTS, MMOE_T_SHARED, MMOE_T_LM_HEAD, MMOE_T_OTHER, MMOE_T_COUNT };
extern const char *const mmoe_timer_names[MMOE_T_COUNT];
void mmoe_profile_get(const mmoe_ctx *c, double *seconds /* MMOE_T_COUNT */);
void mmoe_profile_reset(mmoe_ctx *c);

/* Routing statistics since the last reset (mmoe_ctx_reset keeps them): counts[l * n_experts + e] = the
 * (token, k) slots of layer l routed to expert e, prefill and decode alike; dense layers stay 0. counts holds
 * n_layers * n_experts entries (nothing is written for a dense model). */
void mmoe_expert_counts(const mmoe_ctx *c, uint64_t *counts);
void mmoe_expert_counts_reset(mmoe_ctx *c);

/* Tokenizer (byte-level BPE from the file). encode returns the token count (may exceed cap: then only cap
 * ids were written), or -1. decode appends token id's bytes to out and returns their count (-1: bad id). */
int mmoe_tokenize(const mmoe_model *m, const char *text, size_t len, int32_t *out, int cap);
int mmoe_token_bytes(const mmoe_model *m, int32_t id, char *out, int cap);
/* 1 if generation should stop on this token (<|endoftext|>, <|end|>, ... as flagged by the exporter). */
int mmoe_token_is_stop(const mmoe_model *m, int32_t id);

/* Sampling: temperature <= 0 is greedy (first maximum). rng_state: caller-owned, seeded by mmoe_rng_seed. */
uint64_t mmoe_rng_seed(uint64_t seed);
int32_t mmoe_sample(const float *logits, int n, float temperature, float top_p, uint64_t *rng_state);

#ifdef __cplusplus
}
#endif
#endif
