/* Engine internals shared by loader.c, model.c, tokenizer.c (not part of the public API). */
#ifndef MMOE_INTERNAL_H
#define MMOE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "mmoe.h"

/* File-format constants: must agree with mobile/format.py */
#define MMOE_MAGIC "MMOEINT4"
#define MMOE_VERSION 2u         /* the newest version this engine reads */
#define MMOE_VERSION_MIN 1u     /* version 1: every router f32; version 2: routers f32 or f16 */
#define MMOE_HEADER_SIZE 1024u
#define MMOE_ALIGN 64u
#define MMOE_MAX_LAYERS 256u
#define MMOE_LAYER_KINDS_OFFSET 256u
#define MMOE_NAME_LEN 64
#define MMOE_ENTRY_SIZE 104u
enum { DT_F32 = 0, DT_F16 = 1, DT_Q4 = 2, DT_Q4_EXPERTS = 3 };
enum { TOK_IGNORE_MERGES = 1, TOK_ADD_PREFIX_SPACE = 2 };

typedef struct {
    uint32_t vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, max_seq_len;
    uint32_t n_experts, top_k, expert_ffn_dim, n_shared_experts, shared_ffn_dim, router_score;
    uint32_t norm_topk_prob, tie_embeddings, quant_group;
    int32_t eos_id;
    float rope_theta, norm_eps;
} mmoe_config;

typedef struct {
    const uint8_t *base;  /* n_experts records of rec_bytes: [gate_up block | pad][down block | pad]; NULL when
                           * the model streams its experts (mmoe_model_open_streaming): read them via the cache */
    size_t rec_bytes, down_off;
    uint64_t file_off;    /* the tensor's offset in the file (validated: E * rec_bytes bytes lie inside it) */
    int F, D;
} mmoe_experts;

typedef struct {
    const float *attn_norm, *ffn_norm;
    mmoe_q4_matrix wq, wk, wv, wo;
    int is_moe;
    /* MoE */
    const float *router;         /* E x D fp32, or NULL when the file stores the router in fp16: */
    const uint16_t *router_f16;  /* E x D IEEE half (version-2 files; exactly one of the two is set) */
    const float *expert_bias; /* E */
    mmoe_experts experts;
    int has_shared;
    mmoe_q4_matrix sh_gate_up, sh_down; /* also the dense FFN of a dense layer */
} mmoe_layer;

typedef struct {
    uint32_t n_vocab, n_merges, flags;
    const uint32_t *offs;  /* n_vocab + 1, little-endian u32 (read via memcpy helpers) */
    const uint8_t *pool;
    const uint8_t *merges; /* n_merges x (left, right, result) u32 */
    uint32_t n_special;
    const uint8_t *specials; /* n_special x (id, flags) u32; flags & 1: stop token */
    /* built at load: single-byte token ids, and open-addressing hash tables */
    int32_t byte_tok[256];
    uint64_t *merge_keys; int32_t *merge_vals; uint32_t merge_cap;   /* (left<<32|right) -> rank */
    uint32_t *vocab_hash; uint32_t vocab_cap;                         /* token bytes -> id+1 */
} mmoe_tokenizer;

struct mmoe_model {
    mmoe_config cfg;
    const uint8_t *data; size_t size;
    int mapped; /* data came from mmap (unmap on close) */
    /* streaming (mmoe_model_open_streaming): data is an anonymous copy of every byte outside the routed-expert
     * tensors; the experts are read from fd (or fd_direct, opened O_DIRECT) by the expert cache (cache.c) */
    int stream, fd, fd_direct;
    uint64_t resident_bytes; /* bytes copied into data (page-rounded per range) */
    uint64_t open_rss;       /* this process's VmRSS once the model was open (0: unknown) */
    mmoe_q4_matrix tok_emb, lm_head;
    const float *norm;
    mmoe_layer *layers;
    mmoe_tokenizer tok;
};

void mmoe_seterr(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint32_t mmoe_rd32(const uint8_t *p);
uint64_t mmoe_rd64(const uint8_t *p);
int mmoe_tokenizer_init(mmoe_tokenizer *t, const uint8_t *blob, size_t size, uint32_t vocab_size, char *err,
                        size_t errlen);
void mmoe_tokenizer_free(mmoe_tokenizer *t);

/* thread pool (threads.c): fn(arg, task, n_tasks) for task in [0, n_tasks), task 0 on the caller */
typedef struct mmoe_pool mmoe_pool;
typedef void (*mmoe_task_fn)(void *arg, int task, int n_tasks);
mmoe_pool *mmoe_pool_new(int n_threads);
void mmoe_pool_free(mmoe_pool *p);
int mmoe_pool_size(const mmoe_pool *p);
void mmoe_pool_run(mmoe_pool *p, mmoe_task_fn fn, void *arg, int n_tasks);

/* expert cache (cache.c): per-MoE-layer slots of one expert record each, filled by pread on I/O threads */
typedef struct mmoe_cache mmoe_cache;
size_t mmoe_cache_slot_bytes(const mmoe_model *m);  /* one slot: a record plus its O_DIRECT alignment slack */
size_t mmoe_cache_meta_bytes(const mmoe_model *m, int slots_per_layer); /* its tables and queue */
int mmoe_model_moe_layers(const mmoe_model *m);
mmoe_cache *mmoe_cache_new(const mmoe_model *m, int slots_per_layer, int policy, int io_threads, char *err,
                           size_t errlen);
void mmoe_cache_free(mmoe_cache *c);
/* One wave of layer l's pending experts need[0..n) (ascending ids; cnt = their token slots): experts already
 * cached go to present[], reads for as many of the others as there are free slots are issued on the I/O
 * threads and those experts go to loaded[] (each valid once mmoe_cache_wait_some has handed it out). first: the layer-step's first wave
 * (hit / miss counters and the policy's frequencies are updated there only). */
void mmoe_cache_begin(mmoe_cache *c, int l, const int *need, const int *cnt, int n, int first, int *present,
                      int *n_present, int *loaded, int *n_loaded);
/* Block until some of the wave's reads are done; writes their places in loaded[] to ready and returns their
 * count (0 once every read was handed out), or -1 if a read failed (err says which; the wave is then over). */
int mmoe_cache_wait_some(mmoe_cache *c, int *ready, char *err, size_t errlen);
/* Read the guessed experts guess[0..n) of layer l that are not cached into slots of that layer (not into
 * slots holding other guesses), behind the current wave's reads; settled by the next mmoe_cache_begin. */
void mmoe_cache_prefetch(mmoe_cache *c, int l, const int32_t *guess, int n);
const uint8_t *mmoe_cache_record(const mmoe_cache *c, int l, int e); /* the record of a present/loaded expert */
void mmoe_cache_prompt_begin(mmoe_cache *c); /* an eval from position 0 starts: count its routing */
void mmoe_cache_prompt_end(mmoe_cache *c);   /* ... it ended: the pin policy learns its hot sets */
void mmoe_cache_stats_get(const mmoe_cache *c, uint64_t *out);
void mmoe_cache_stats_clear(mmoe_cache *c);
uint64_t mmoe_read_rss(void); /* VmRSS of this process in bytes, 0 if unknown */

#endif
