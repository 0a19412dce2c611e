/* The forward pass: prefill (a prompt in chunks of up to MMOE_BATCH_MAX tokens, each as one batch) and decode
 * (one token), fp16 KV cache, GQA attention, RoPE (rotate-half, as model/model.py), RMSNorm, SwiGLU, fp32 router with
 * top-k + renormalisation + selection-only bias, shared experts, routed experts computed only for the
 * selected ones (a decode step reads only their INT4 records). Every quantized matmul input is quantized
 * per token to int8 exactly as model/quant.py does, then goes through the kernels of kernels.h. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention.h"
#include "internal.h"

/* Prefill batch cap. Every routed expert's weights are read once per batch, so a larger batch gives each expert
 * more token rows per read (S at top-4 of 60: ~8.5 rows an expert at 128 tokens, ~34 at 512); the batch
 * buffers grow linearly (S: ~9 MB at 128, ~36 MB at 512; mmoe_min_budget counts them). A context never
 * allocates more than its max_ctx rows (ctx_dims). */
#ifndef MMOE_BATCH_MAX
#define MMOE_BATCH_MAX 512
#endif

const char *const mmoe_timer_names[MMOE_T_COUNT] = {"attention", "router", "experts", "shared", "lm_head", "other"};

struct mmoe_ctx {
    const mmoe_model *m;
    mmoe_pool *pool;
    const mmoe_kernel_set *ks;
    int float_path, max_ctx, pos;
    int batch; /* tokens a forward_chunk takes at most: min(MMOE_BATCH_MAX, max_ctx) */
    int D, H, KV, hd, QD, KVD, E, K, Fmax, Kmax;
    /* [layer][kv head][max_ctx][hd] fp16: each (layer, KV head) is one contiguous stream for attention. The
     * position-major [layer][max_ctx][KVD] layout made a head's keys a 128-byte-out-of-640 strided read, which
     * at context 1024 came from DRAM half-prefetched (S decode at context 1024, 1 thread: 30 -> 37 tok/s). */
    uint16_t *kc, *vc;
    float *rope_inv;     /* hd / 2 */
    float *x, *xn, *q, *k, *v, *att, *tmp, *y, *gu, *hid, *rlog, *scores;
    int8_t *xq, *hq;
    float *xs, *hs, *gates;
    int32_t *ids;
    /* routed-expert gather buffers (tokens of one expert) */
    int8_t *gxq, *ghq;
    float *gxs, *ghs, *ggu, *ghid, *gout;
    int *gslot;            /* gathered item -> its expert */
    int *grow, *gcnt;      /* gathered item -> its first row and row count in the gathered buffers */
    int *gpend, *gneed, *gncnt, *gpres, *gload, *gready, *gidx; /* cache waves (E each; gidx: expert -> item) */
    int *slot_row;        /* slot (t * K + k) -> its row in the gathered expert buffers */
    struct mm_item *items; /* E + 4 matmuls of one batched job */
    struct fx_item *fitems; /* E + 4 experts of one decode job */
    float *fxh;             /* [thread][Fmax] decode scratch: a split expert's hidden row ... */
    int8_t *fxq;            /* ... and its int8 quantization */
    int att_impl;          /* MMOE_ATT_SCALAR / MMOE_ATT_SIMD (same values either way) */
    double t[MMOE_T_COUNT];
    uint64_t *ecount;      /* [layer][expert]: (token, k) slots routed there since the last reset */
    mmoe_cache *cache;     /* routed experts read from the file (mmoe_ctx_new_streaming), else NULL */
    uint64_t budget, min_budget;
    int failed;            /* an expert read failed during this eval: errmsg says why */
    int prefetch;          /* mmoe_ctx_set_prefetch */
    float *pf_xn, *pf_log; /* the next layer's router input and scores (prefetch guess) */
    int32_t *pf_ids;
    char errmsg[256];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- matmuls over threads ------------------------------------------------------------------------------
 * One pool job runs a list of matmuls (q/k/v of a layer; every selected expert's gate_up plus the shared
 * expert's): their rows, in blocks of 8, are split across the threads by cost (rows x (tokens + 1): the +1 is
 * the weight streaming a row costs even for one token), so a decode step pays one wakeup per list instead of
 * one per matrix, and small matrices (one expert's 320 x 1280) no longer leave a thread idle. The kernels'
 * results depend only on (row, token), never on how rows are split, so this changes no bits. */
typedef struct mm_item {
    mmoe_q4_matrix W;
    const int8_t *Xq;
    const float *xs;
    int M, ldy;
    float *Y;
} mm_item;

typedef struct {
    const mmoe_ctx *c;
    const mm_item *it;
    int n;
    long total; /* sum of item costs */
} mm_job;

/* Debug path: dequantized weights x fake-quantized activations in plain fp32 (the PyTorch QAT arithmetic). */
static void float_rows(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    int K = W->cols, G = K / 32;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qs = W->qs + (size_t)r * K / 2;
        float acc = 0.0f;
        for (int g = 0; g < G; g++) {
            float d = mmoe_fp16_to_f32(W->d[(size_t)r * G + g]);
            for (int i = 0; i < 32; i++) {
                uint8_t b = qs[g * 16 + (i & 15)];
                int q = (i < 16 ? (b & 15) : (b >> 4)) - 8;
                acc += ((float)q * d) * ((float)xq[g * 32 + i] * xs);
            }
        }
        y[r - r0] = acc;
    }
}

static void mm_rows(const mmoe_ctx *c, const mm_item *j, int r0, int r1) {
    if (c->float_path) {
        for (int m = 0; m < j->M; m++)
            float_rows(&j->W, j->Xq + (size_t)m * j->W.cols, j->xs[m], j->Y + (size_t)m * j->ldy + r0, r0, r1);
    } else if (j->M == 1) {
        c->ks->gemv(&j->W, j->Xq, j->xs[0], j->Y + r0, r0, r1);
    } else {
        c->ks->gemm(&j->W, j->Xq, j->xs, j->M, j->Y + r0, j->ldy, r0, r1);
    }
}

static void mm_task(void *arg, int t, int nt) {
    const mm_job *j = arg;
    long lo = j->total * t / nt, hi = j->total * (t + 1) / nt, base = 0;
    for (int i = 0; i < j->n; i++) {
        const mm_item *it = &j->it[i];
        long nb = (it->W.rows + 7) / 8, cb = 8L * (it->M + 1);
        /* this thread takes the blocks b whose start cost base + b * cb lies in [lo, hi) */
        long b0 = lo <= base ? 0 : (lo - base + cb - 1) / cb, b1 = hi <= base ? 0 : (hi - base + cb - 1) / cb;
        if (b1 > nb) b1 = nb;
        if (b0 < b1) {
            int r0 = (int)(b0 * 8), r1 = (int)(b1 * 8) < it->W.rows ? (int)(b1 * 8) : it->W.rows;
            mm_rows(j->c, it, r0, r1);
        }
        base += nb * cb;
    }
}

/* Threads for a job over `rows` matrix rows: the whole pool, or one per 64 rows for tiny matrices (waking a
 * thread costs more than it computes on a few rows). */
static int threads_for_rows(const mmoe_ctx *c, long rows) {
    int nt = mmoe_pool_size(c->pool);
    if (rows < 64L * nt) nt = rows / 64 > 0 ? (int)(rows / 64) : 1;
    return nt;
}

static void matmul_multi(mmoe_ctx *c, const mm_item *it, int n) {
    mm_job j = {c, it, n, 0};
    long rows = 0;
    for (int i = 0; i < n; i++) {
        j.total += (long)((it[i].W.rows + 7) / 8) * 8L * (it[i].M + 1);
        rows += it[i].W.rows;
    }
    int nt = threads_for_rows(c, rows);
    mmoe_pool_run(c->pool, mm_task, &j, nt);
}

/* Y[m * ldy + r] = W row r . dequant(Xq row m) for m < M */
static void matmul(mmoe_ctx *c, const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy) {
    mm_item it = {*W, Xq, xs, M, ldy, Y};
    matmul_multi(c, &it, 1);
}

static void quantize_rows(const mmoe_ctx *c, const float *x, int8_t *q, float *s, int M, int K) {
    for (int m = 0; m < M; m++) s[m] = c->ks->quantize(x + (size_t)m * K, q + (size_t)m * K, K);
}

static void rmsnorm(const float *x, const float *w, float *out, int D, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < D; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) out[i] = w[i] * (x[i] * r);
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* SwiGLU on a fused [gate; up] row of 2F -> F */
static void swiglu(const float *gu, float *h, int F) {
    for (int i = 0; i < F; i++) h[i] = silu(gu[i]) * gu[F + i];
}

static void dequant_row(const mmoe_q4_matrix *W, int r, float *out) {
    int K = W->cols, G = K / 32;
    const uint8_t *qs = W->qs + (size_t)r * K / 2;
    for (int g = 0; g < G; g++) {
        float d = mmoe_fp16_to_f32(W->d[(size_t)r * G + g]);
        for (int i = 0; i < 16; i++) {
            uint8_t b = qs[g * 16 + i];
            out[g * 32 + i] = (float)((b & 15) - 8) * d;
            out[g * 32 + 16 + i] = (float)((b >> 4) - 8) * d;
        }
    }
}

/* rotate-half RoPE at position p on n_heads heads of hd: x*cos + rotate_half(x)*sin (model/model.py) */
static void rope(const mmoe_ctx *c, float *x, int n_heads, int p) {
    int h2 = c->hd / 2;
    for (int i = 0; i < h2; i++) {
        float f = (float)p * c->rope_inv[i], cs = cosf(f), sn = sinf(f);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (size_t)h * c->hd;
            float a = v[i], b = v[i + h2];
            v[i] = a * cs + (-b) * sn;
            v[i + h2] = b * cs + a * sn;
        }
    }
}

/* ---- attention over the KV cache, parallel over (token, head) ---------------------------------------------- */
/* Work unit: the query heads of one KV head that share each fp16 K/V row conversion (GQA), up to
 * MMOE_ATT_GROUP at a time; 2 when that leaves too few units to keep the threads busy (decode). The chunking
 * changes no value (mmoe_att_group == mmoe_att_head per head). */
#define MMOE_ATT_GROUP 4
typedef struct {
    mmoe_ctx *c;
    int layer, n, cs;
} att_job;

/* Scratch scores a thread holds: one row of max_ctx for each head of a decode chunk or each row of a prefill tile */
#define MMOE_ATT_SCR (MMOE_ATT_TILE > MMOE_ATT_GROUP ? MMOE_ATT_TILE : MMOE_ATT_GROUP)

static void att_task(void *arg, int t, int nt) {
    const att_job *j = arg;
    mmoe_ctx *c = j->c;
    int hd = c->hd, grp = c->H / c->KV, cs = j->cs, nch = (grp + cs - 1) / cs, total = j->n * c->KV * nch;
    float *sc = c->scores + (size_t)t * MMOE_ATT_SCR * c->max_ctx;
    const uint16_t *kc = c->kc + (size_t)j->layer * c->max_ctx * c->KVD; /* this layer's KV heads */
    const uint16_t *vc = c->vc + (size_t)j->layer * c->max_ctx * c->KVD;
    const size_t head = (size_t)c->max_ctx * (size_t)hd;                  /* one KV head's [max_ctx][hd] */
    float scale = 1.0f / sqrtf((float)hd);
    for (int w = total * t / nt; w < total * (t + 1) / nt; w++) { /* unit = (token, kv head, chunk of its heads) */
        int tok = w / (c->KV * nch), kvh = w / nch % c->KV, ci = w % nch, p = c->pos + tok;
        int h = kvh * grp + ci * cs, ng = grp - ci * cs < cs ? grp - ci * cs : cs;
        mmoe_att_group(c->q + (size_t)tok * c->QD + (size_t)h * hd, ng, kc + (size_t)kvh * head,
                       vc + (size_t)kvh * head, (size_t)hd, p + 1, hd, scale, sc,
                       c->att + (size_t)tok * c->QD + (size_t)h * hd, c->att_impl);
    }
}

/* Prefill (n > 1): unit = (block of MMOE_ATT_QBLOCK query tokens, KV head) with all its query heads, whose
 * (token, head) rows mmoe_att_block runs in tiles sharing each K/V row's fp16 conversion, instead of one
 * conversion per token. Units are dealt round-robin: a later block sees more keys, so contiguous ranges left the
 * first thread a quarter of a 2-thread prefill's work. Same values as att_task (mmoe_att_block == mmoe_att_group
 * per token). */
#define MMOE_ATT_QBLOCK 8
static void att_block_task(void *arg, int t, int nt) {
    const att_job *j = arg;
    mmoe_ctx *c = j->c;
    int hd = c->hd, grp = c->H / c->KV, nb = (j->n + MMOE_ATT_QBLOCK - 1) / MMOE_ATT_QBLOCK, total = nb * c->KV;
    float *sc = c->scores + (size_t)t * MMOE_ATT_SCR * c->max_ctx;
    const uint16_t *kc = c->kc + (size_t)j->layer * c->max_ctx * c->KVD;
    const uint16_t *vc = c->vc + (size_t)j->layer * c->max_ctx * c->KVD;
    const size_t head = (size_t)c->max_ctx * (size_t)hd;
    float scale = 1.0f / sqrtf((float)hd);
    for (int w = t; w < total; w += nt) {
        int tok = w / c->KV * MMOE_ATT_QBLOCK, kvh = w % c->KV, h = kvh * grp;
        int nq = j->n - tok < MMOE_ATT_QBLOCK ? j->n - tok : MMOE_ATT_QBLOCK;
        mmoe_att_block(c->q + (size_t)tok * c->QD + (size_t)h * hd, (size_t)c->QD, nq, grp, kc + (size_t)kvh * head,
                       vc + (size_t)kvh * head, (size_t)hd, c->pos + tok + 1, hd, scale, sc,
                       c->att + (size_t)tok * c->QD + (size_t)h * hd, (size_t)c->QD, c->att_impl);
    }
}

/* ---- router: scores, top-k with the selection bias, renormalised gates ----------------------------------- */
/* The fp32 router logits, split over the threads by (token, expert): the router matrix (E x D fp32, 327 KB a
 * layer for S; or fp16, each weight converted exactly, then the same fp32 dot) is streamed like any weight, and
 * each logit is one dot whatever thread computes it. */
typedef struct {
    mmoe_ctx *c;
    const mmoe_layer *L;
    int n;
    const float *xn; /* n x D router inputs */
    float *out;      /* n x E logits */
} route_job;

static void route_task(void *arg, int t, int nt) {
    const route_job *j = arg;
    mmoe_ctx *c = j->c;
    long E = c->E, D = c->D, total = (long)j->n * E;
    const uint16_t *r16 = j->L->router_f16; /* an fp16 router (--router-dtype f16) reads half the bytes */
    for (long w = total * t / nt; w < total * (t + 1) / nt; w++) {
        const float *x = j->xn + (size_t)(w / E) * (size_t)D;
        size_t row = (size_t)(w % E) * (size_t)D;
        j->out[w] = r16 ? mmoe_dot_f16(x, r16 + row, (int)D, c->att_impl)
                        : mmoe_dot_f32(x, j->L->router + row, (int)D, c->att_impl);
    }
}

/* Router logits -> selection scores in place: softmax (router_score 0) or the sigmoid of each logit. */
static void router_scores(float *lg, int E, int router_score) {
    if (router_score == 0) {
        float mx = lg[0], sum = 0.0f;
        for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
        for (int e = 0; e < E; e++) sum += (lg[e] = expf(lg[e] - mx));
        for (int e = 0; e < E; e++) lg[e] /= sum;
    } else {
        for (int e = 0; e < E; e++) lg[e] = 1.0f / (1.0f + expf(-lg[e]));
    }
}

/* ids[k] = the expert with the k-th largest score + selection bias; ties -> lower expert id. */
static void select_topk(const float *score, const float *bias, int E, int K, int32_t *ids) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < E; e++) {
            int used = 0;
            for (int kk = 0; kk < k; kk++) used |= ids[kk] == e;
            float v = score[e] + bias[e];
            if (isnan(v)) v = -INFINITY; /* NaN ranks like -inf, as in kernels/router.py (v > NaN is never true) */
            if (!used && (best < 0 || v > bv)) {
                best = e;
                bv = v;
            }
        }
        ids[k] = best;
    }
}

static void route(mmoe_ctx *c, const mmoe_layer *L, uint64_t *ecount, int n) {
    const mmoe_config *cf = &c->m->cfg;
    int E = c->E, K = c->K;
    route_job rj = {c, L, n, c->xn, c->rlog};
    mmoe_pool_run(c->pool, route_task, &rj, (long)n * E >= 16 ? mmoe_pool_size(c->pool) : 1);
    for (int t = 0; t < n; t++) {
        float *lg = c->rlog + (size_t)t * E;
        router_scores(lg, E, cf->router_score);
        int32_t *ids = c->ids + (size_t)t * K;
        float *g = c->gates + (size_t)t * K, gsum = 0.0f;
        select_topk(lg, L->expert_bias, E, K, ids);
        for (int k = 0; k < K; k++) {
            ecount[ids[k]]++;
            g[k] = lg[ids[k]];
            gsum += g[k];
        }
        if (cf->norm_topk_prob) {
            if (gsum < 1e-20f) gsum = 1e-20f;
            for (int k = 0; k < K; k++) g[k] /= gsum;
        }
    }
}

/* Prefetch guess for a decode step at MoE layer l: the next MoE layer's router on the current residual (after
 * layer l's attention; layer l's MoE output is not added yet), normed with that layer's ffn norm, top-k by the
 * same scores and selection bias as route(); the cache reads the guessed experts it lacks. */
static void prefetch_next(mmoe_ctx *c, int l) {
    const mmoe_model *m = c->m;
    uint32_t nl = (uint32_t)l + 1;
    while (nl < m->cfg.n_layers && !m->layers[nl].is_moe) nl++;
    if (nl >= m->cfg.n_layers) return;
    const mmoe_layer *N = &m->layers[nl];
    int E = c->E, K = c->K;
    rmsnorm(c->x, N->ffn_norm, c->pf_xn, c->D, m->cfg.norm_eps);
    route_job rj = {c, N, 1, c->pf_xn, c->pf_log};
    mmoe_pool_run(c->pool, route_task, &rj, E >= 16 ? mmoe_pool_size(c->pool) : 1);
    router_scores(c->pf_log, E, m->cfg.router_score); /* the same scores and selection as route() */
    select_topk(c->pf_log, N->expert_bias, E, K, c->pf_ids);
    mmoe_cache_prefetch(c->cache, (int)nl, c->pf_ids, K);
}

static mmoe_q4_matrix expert_mat(const mmoe_ctx *c, const mmoe_layer *L, int l, int e, int down) {
    const mmoe_experts *x = &L->experts;
    const uint8_t *p = c->cache ? mmoe_cache_record(c->cache, l, e) : x->base + (size_t)e * x->rec_bytes;
    p += down ? x->down_off : 0;
    int rows = down ? x->D : 2 * x->F, cols = down ? x->F : x->D;
    mmoe_q4_matrix m = {p, (const mmoe_fp16 *)(const void *)(p + (size_t)rows * cols / 2), rows, cols};
    return m;
}

/* ---- decode (one token): each expert's gate_up -> SwiGLU -> int8 quantize -> down fused into one job -------
 * The prefill path below runs every gate_up as one job, SwiGLU + quantize on the calling thread, then every
 * down as a second job. For one token each expert is two ~200 KB matrices, so that is two wake-ups per layer
 * plus a serial middle step; here each thread instead takes whole experts (gate_up, SwiGLU, quantize and down
 * back to back, the hidden row still in L1) and the experts left over (count % threads) are split by rows: a
 * thread computes its rows of their gate_ups first, its whole experts next, and only then waits (an in-job
 * counter, normally already complete) to quantize their hidden rows into its own scratch and compute its rows
 * of their downs. Every value is still one row of one kernel on the same inputs, so the bits are unchanged.
 * Measured (S, 2-vCPU dev VM at load 8-10, engines interleaved in one process): within +-5% noise of the
 * two-job path at 1 and 2 threads, contexts 0 and 1024. Not kept: every expert split by rows with the barrier
 * after all gate_ups (0.78x at 2 threads: a preempted thread stalls the other mid-job), and prefetching the
 * first 16 KB of the next expert's matrices (no difference outside the noise; the gemv already prefetches
 * each 8-row block while computing the one before). */
typedef struct fx_item {
    mmoe_q4_matrix gu, dn;
    const int8_t *xq; /* the token's quantized input and its scale */
    const float *xs;
    float *g, *h;     /* 2F gate_up outputs, F hidden */
    int8_t *hq;       /* F quantized hidden (+ its scale hs) */
    float *hs, *out;  /* out: D */
} fx_item;

typedef struct {
    const mmoe_ctx *c;
    const fx_item *it;
    int ni, whole; /* items [0, whole) go whole to thread u % nt; [whole, ni) are split by rows */
    atomic_int arrived;
} fx_job;

/* rows [r0, r1) of a rows-row matrix for thread t of nt, in blocks of 8 */
static void fx_rows(int rows, int t, int nt, int *r0, int *r1) {
    int nb = (rows + 7) / 8;
    *r0 = nb * t / nt * 8;
    *r1 = nb * (t + 1) / nt * 8;
    if (*r0 > rows) *r0 = rows;
    if (*r1 > rows) *r1 = rows;
}

static void fx_task(void *arg, int t, int nt) {
    fx_job *j = arg;
    const mmoe_ctx *c = j->c;
    int split = j->ni - j->whole;
    for (int u = j->whole; u < j->ni; u++) {
        const fx_item *x = &j->it[u];
        mm_item g = {x->gu, x->xq, x->xs, 1, x->gu.rows, x->g};
        int r0, r1;
        fx_rows(x->gu.rows, t, nt, &r0, &r1);
        if (r0 < r1) mm_rows(c, &g, r0, r1);
    }
    if (split) atomic_fetch_add_explicit(&j->arrived, 1, memory_order_release);
    for (int u = t; u < j->whole; u += nt) {
        const fx_item *x = &j->it[u];
        int F = x->dn.cols;
        mm_item g = {x->gu, x->xq, x->xs, 1, x->gu.rows, x->g};
        mm_rows(c, &g, 0, x->gu.rows);
        swiglu(x->g, x->h, F);
        x->hs[0] = c->ks->quantize(x->h, x->hq, F);
        mm_item d = {x->dn, x->hq, x->hs, 1, x->dn.rows, x->out};
        mm_rows(c, &d, 0, x->dn.rows);
    }
    if (!split) return;
    while (atomic_load_explicit(&j->arrived, memory_order_acquire) < nt) sched_yield();
    float *h = c->fxh + (size_t)t * c->Fmax, hs;
    int8_t *hq = c->fxq + (size_t)t * c->Fmax;
    for (int u = j->whole; u < j->ni; u++) { /* every thread quantizes the same row: the same bytes */
        const fx_item *x = &j->it[u];
        int F = x->dn.cols, r0, r1;
        swiglu(x->g, h, F);
        hs = c->ks->quantize(h, hq, F);
        mm_item d = {x->dn, hq, &hs, 1, x->dn.rows, x->out};
        fx_rows(x->dn.rows, t, nt, &r0, &r1);
        if (r0 < r1) mm_rows(c, &d, r0, r1);
    }
}

static void expert_group_decode(mmoe_ctx *c, const mmoe_layer *L, int l, const int *sel, int ns, int S) {
    int D = c->D, F = L->experts.F, ni = 0;
    long rows = 0;
    fx_item *it = c->fitems;
    for (int q = 0; q < ns; q++) {
        int j = sel[q], r0 = c->grow[j];
        it[ni++] = (fx_item){expert_mat(c, L, l, c->gslot[j], 0), expert_mat(c, L, l, c->gslot[j], 1),
                             c->gxq + (size_t)r0 * D, c->gxs + r0, c->ggu + (size_t)r0 * 2 * F,
                             c->ghid + (size_t)r0 * F, c->ghq + (size_t)r0 * F, c->ghs + r0,
                             c->gout + (size_t)r0 * D};
    }
    if (S) it[ni++] = (fx_item){L->sh_gate_up, L->sh_down, c->xq, c->xs, c->gu, c->hid, c->hq, c->hs, c->tmp};
    if (!ni) return;
    for (int u = 0; u < ni; u++) rows += it[u].gu.rows + it[u].dn.rows;
    int nt = threads_for_rows(c, rows);
    fx_job j = {c, it, ni, ni / nt * nt, 0};
    atomic_init(&j.arrived, 0);
    mmoe_pool_run(c->pool, fx_task, &j, nt);
}

/* The gathered items sel[0..ns) (their weights must be in memory) and, if with_shared, the shared expert(s):
 * every gate_up as one threaded job, SwiGLU + quantize per row, every down projection as a second job (one token:
 * expert_group_decode's single fused job instead). Each output row depends only on its own inputs, so running
 * the items in several groups (the expert cache's waves) gives the same bits as one group. */
static void expert_group(mmoe_ctx *c, const mmoe_layer *L, int l, const int *sel, int ns, int with_shared, int n) {
    int D = c->D, F = L->experts.F, S = with_shared && L->has_shared ? L->sh_down.cols : 0, ni = 0;
    if (n == 1) {
        expert_group_decode(c, L, l, sel, ns, S);
        return;
    }
    mm_item *it = c->items;
    for (int q = 0; q < ns; q++) {
        int j = sel[q], r0 = c->grow[j];
        it[ni++] = (mm_item){expert_mat(c, L, l, c->gslot[j], 0), c->gxq + (size_t)r0 * D, c->gxs + r0, c->gcnt[j],
                             2 * F, c->ggu + (size_t)r0 * 2 * F};
    }
    if (S) it[ni++] = (mm_item){L->sh_gate_up, c->xq, c->xs, n, 2 * S, c->gu};
    if (!ni) return;
    matmul_multi(c, it, ni);
    for (int q = 0; q < ns; q++) {
        int j = sel[q], r0 = c->grow[j];
        for (int i = r0; i < r0 + c->gcnt[j]; i++) swiglu(c->ggu + (size_t)i * 2 * F, c->ghid + (size_t)i * F, F);
        quantize_rows(c, c->ghid + (size_t)r0 * F, c->ghq + (size_t)r0 * F, c->ghs + r0, c->gcnt[j], F);
    }
    if (S) {
        for (int t = 0; t < n; t++) swiglu(c->gu + (size_t)t * 2 * S, c->hid + (size_t)t * S, S);
        quantize_rows(c, c->hid, c->hq, c->hs, n, S);
    }
    ni = 0; /* second job: the same experts in the same order, now their down projections */
    for (int q = 0; q < ns; q++) {
        int j = sel[q], r0 = c->grow[j];
        it[ni++] = (mm_item){expert_mat(c, L, l, c->gslot[j], 1), c->ghq + (size_t)r0 * F, c->ghs + r0, c->gcnt[j],
                             D, c->gout + (size_t)r0 * D};
    }
    if (S) it[ni++] = (mm_item){L->sh_down, c->hq, c->hs, n, D, c->tmp};
    matmul_multi(c, it, ni);
}

/* Routed experts plus the shared expert(s): gather, per expert, the token-slots that picked it (a small batch),
 * compute them (expert_group), sum the K slots in slot order, then + shared; result in c->y. With an expert
 * cache, the experts already cached (and the shared one) are computed while the I/O threads read the others,
 * which are computed as their reads complete; when a prefill chunk selects more experts than a layer has slots this repeats in waves. Returns -1 when a
 * read failed (c->errmsg). */
static int experts(mmoe_ctx *c, const mmoe_layer *L, int l, int n) {
    int D = c->D, K = c->K, ni = 0, rows = 0;
    for (int e = 0; e < c->E; e++) {
        int cnt = 0;
        for (int s = 0; s < n * K; s++)
            if (c->ids[s] == e) {
                int t = s / K;
                memcpy(c->gxq + (size_t)(rows + cnt) * D, c->xq + (size_t)t * D, (size_t)D);
                c->gxs[rows + cnt] = c->xs[t];
                c->slot_row[s] = rows + cnt++;
            }
        if (!cnt) continue;
        c->gslot[ni] = e; /* the expert of item ni */
        c->grow[ni] = rows;
        c->gcnt[ni++] = cnt;
        rows += cnt;
    }
    if (!c->cache) {
        for (int j = 0; j < ni; j++) c->gpend[j] = j;
        expert_group(c, L, l, c->gpend, ni, 1, n);
    } else {
        int np = ni, first = 1;
        for (int j = 0; j < ni; j++) {
            c->gpend[j] = j;
            c->gidx[c->gslot[j]] = j;
        }
        while (np > 0) {
            int npres = 0, nload = 0;
            for (int q = 0; q < np; q++) {
                c->gneed[q] = c->gslot[c->gpend[q]];
                c->gncnt[q] = c->gcnt[c->gpend[q]];
            }
            mmoe_cache_begin(c->cache, l, c->gneed, c->gncnt, np, first, c->gpres, &npres, c->gload, &nload);
            if (first && n == 1 && c->prefetch) prefetch_next(c, l); /* queued behind this wave's reads */
            for (int q = 0; q < npres; q++) c->gpres[q] = c->gidx[c->gpres[q]];
            expert_group(c, L, l, c->gpres, npres, first, n); /* overlaps the reads just issued */
            for (int q = 0; q < nload; q++) c->gload[q] = c->gidx[c->gload[q]];
            for (int got = 0; got < nload;) { /* each read as it completes, while the others still run */
                int k = mmoe_cache_wait_some(c->cache, c->gready, c->errmsg, sizeof c->errmsg);
                if (k <= 0) {
                    if (k == 0) mmoe_seterr(c->errmsg, sizeof c->errmsg, "expert cache: reads lost");
                    c->failed = 1;
                    return -1;
                }
                for (int q = 0; q < k; q++) c->gready[q] = c->gload[c->gready[q]];
                expert_group(c, L, l, c->gready, k, 0, n);
                got += k;
            }
            /* what is left: the experts neither present nor loaded in this wave (ascending order kept) */
            int k = 0;
            for (int q = 0; q < np; q++) {
                int j = c->gpend[q], done = 0;
                for (int i = 0; i < npres && !done; i++) done = c->gpres[i] == j;
                for (int i = 0; i < nload && !done; i++) done = c->gload[i] == j;
                if (!done) c->gpend[k++] = j;
            }
            np = k;
            first = 0;
        }
    }
    int S = L->has_shared;
    for (int t = 0; t < n; t++) { /* sum the K slots in slot order, as the PyTorch reference does */
        float *y = c->y + (size_t)t * D;
        for (int i = 0; i < D; i++) y[i] = 0.0f;
        for (int k = 0; k < K; k++) {
            const float *o = c->gout + (size_t)c->slot_row[t * K + k] * D;
            float g = c->gates[(size_t)t * K + k];
            for (int i = 0; i < D; i++) y[i] += o[i] * g;
        }
        if (S)
            for (int i = 0; i < D; i++) y[i] += c->tmp[(size_t)t * D + i];
    }
    return 0;
}

/* SwiGLU FFN (shared expert or dense FFN) on the already-quantized c->xq; result in c->tmp */
static void ffn(mmoe_ctx *c, const mmoe_q4_matrix *gu, const mmoe_q4_matrix *dn, int n) {
    int F = dn->cols;
    matmul(c, gu, c->xq, c->xs, n, c->gu, 2 * F);
    for (int t = 0; t < n; t++) swiglu(c->gu + (size_t)t * 2 * F, c->hid + (size_t)t * F, F);
    quantize_rows(c, c->hid, c->hq, c->hs, n, F);
    matmul(c, dn, c->hq, c->hs, n, c->tmp, c->D);
}

static int forward_chunk(mmoe_ctx *c, const int32_t *ids, int n, float *logits, int all_logits) {
    const mmoe_model *m = c->m;
    const mmoe_config *cf = &m->cfg;
    int D = c->D;
    double t0 = now(), t1;
    for (int t = 0; t < n; t++) dequant_row(&m->tok_emb, ids[t], c->x + (size_t)t * D);
    c->t[MMOE_T_OTHER] += now() - t0;
    for (uint32_t l = 0; l < cf->n_layers; l++) {
        const mmoe_layer *L = &m->layers[l];
        t0 = now();
        for (int t = 0; t < n; t++) rmsnorm(c->x + (size_t)t * D, L->attn_norm, c->xn + (size_t)t * D, D, cf->norm_eps);
        quantize_rows(c, c->xn, c->xq, c->xs, n, D);
        mm_item qkv[3] = {{L->wq, c->xq, c->xs, n, c->QD, c->q},
                          {L->wk, c->xq, c->xs, n, c->KVD, c->k},
                          {L->wv, c->xq, c->xs, n, c->KVD, c->v}};
        matmul_multi(c, qkv, 3);
        for (int t = 0; t < n; t++) {
            rope(c, c->q + (size_t)t * c->QD, c->H, c->pos + t);
            rope(c, c->k + (size_t)t * c->KVD, c->KV, c->pos + t);
            for (int h = 0; h < c->KV; h++) {
                size_t at = (((size_t)l * c->KV + h) * c->max_ctx + (size_t)(c->pos + t)) * c->hd;
                const float *kh = c->k + (size_t)t * c->KVD + (size_t)h * c->hd;
                const float *vh = c->v + (size_t)t * c->KVD + (size_t)h * c->hd;
                for (int i = 0; i < c->hd; i++) {
                    c->kc[at + i] = mmoe_f32_to_fp16(kh[i]);
                    c->vc[at + i] = mmoe_f32_to_fp16(vh[i]);
                }
            }
        }
        int grp = c->H / c->KV, nt = mmoe_pool_size(c->pool);
        att_job aj = {c, (int)l, n, grp < MMOE_ATT_GROUP ? grp : MMOE_ATT_GROUP};
        if (nt > 1 && (long)n * c->KV * ((grp + aj.cs - 1) / aj.cs) < 4L * nt) aj.cs = aj.cs >= 2 ? 2 : 1;
        long blocks = ((long)n + MMOE_ATT_QBLOCK - 1) / MMOE_ATT_QBLOCK * c->KV;
        mmoe_pool_run(c->pool, n > 1 && blocks >= nt ? att_block_task : att_task, &aj, nt);
        quantize_rows(c, c->att, c->xq, c->xs, n, c->QD);
        matmul(c, &L->wo, c->xq, c->xs, n, c->tmp, D);
        for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->tmp[i];
        t1 = now();
        c->t[MMOE_T_ATTENTION] += t1 - t0;
        t0 = t1;
        for (int t = 0; t < n; t++) rmsnorm(c->x + (size_t)t * D, L->ffn_norm, c->xn + (size_t)t * D, D, cf->norm_eps);
        quantize_rows(c, c->xn, c->xq, c->xs, n, D);
        if (L->is_moe) {
            route(c, L, c->ecount + (size_t)l * (size_t)c->E, n);
            t1 = now();
            c->t[MMOE_T_ROUTER] += t1 - t0;
            t0 = t1;
            /* routed + shared (prefill: one job each for gate_up and down; decode: one fused job): "experts" */
            if (experts(c, L, (int)l, n)) return -1;
            for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->y[i];
            c->t[MMOE_T_EXPERTS] += now() - t0;
        } else { /* a dense layer's FFN counts as "experts" (the FFN the routed experts replace) */
            ffn(c, &L->sh_gate_up, &L->sh_down, n);
            for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->tmp[i];
            c->t[MMOE_T_EXPERTS] += now() - t0;
        }
    }
    t0 = now();
    int first = all_logits ? 0 : n - 1, cnt = n - first;
    for (int t = first; t < n; t++) rmsnorm(c->x + (size_t)t * D, m->norm, c->xn + (size_t)(t - first) * D, D, cf->norm_eps);
    quantize_rows(c, c->xn, c->xq, c->xs, cnt, D);
    t1 = now();
    c->t[MMOE_T_OTHER] += t1 - t0;
    if (logits) matmul(c, &m->lm_head, c->xq, c->xs, cnt, logits, (int)cf->vocab_size);
    c->t[MMOE_T_LM_HEAD] += now() - t1;
    return 0;
}

int mmoe_eval(mmoe_ctx *c, const int32_t *ids, int n, float *logits, int all_logits, char *err, size_t errlen) {
    uint32_t V = c->m->cfg.vocab_size;
    if (n < 1) {
        mmoe_seterr(err, errlen, "eval: need at least one token");
        return -1;
    }
    if (n > c->max_ctx - c->pos) {
        mmoe_seterr(err, errlen, "eval: context full (%d cached + %d new > %d)", c->pos, n, c->max_ctx);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= V) {
            mmoe_seterr(err, errlen, "eval: token id %d out of range [0, %u)", ids[i], V);
            return -1;
        }
    int prompt = c->cache && c->pos == 0; /* the pin policy learns its hot sets from a prompt's routing */
    if (prompt) mmoe_cache_prompt_begin(c->cache);
    for (int s = 0; s < n; s += c->batch) {
        int cnt = n - s < c->batch ? n - s : c->batch;
        float *out = NULL;
        if (all_logits) out = logits + (size_t)s * V;
        else if (s + cnt == n) out = logits;
        if (forward_chunk(c, ids + s, cnt, out, all_logits)) { /* only an expert read can fail */
            mmoe_seterr(err, errlen, "eval: %s", c->errmsg);
            c->failed = 0;
            if (prompt) mmoe_cache_prompt_end(c->cache);
            return -1;
        }
        c->pos += cnt;
    }
    if (prompt) mmoe_cache_prompt_end(c->cache);
    return 0;
}

/* ---- context --------------------------------------------------------------------------------------------- */
void mmoe_ctx_free(mmoe_ctx *c) {
    if (!c) return;
    if (c->pool) mmoe_pool_free(c->pool);
    mmoe_cache_free(c->cache);
    void *bufs[] = {c->kc, c->vc, c->rope_inv, c->x, c->xn, c->q, c->k, c->v, c->att, c->tmp, c->y, c->gu, c->hid,
                    c->rlog, c->scores, c->xq, c->hq, c->xs, c->hs, c->gates, c->ids, c->gxq, c->ghq,
                    c->gxs, c->ghs, c->ggu, c->ghid, c->gout, c->gslot, c->grow, c->gcnt, c->gpend, c->gneed,
                    c->gncnt, c->gpres, c->gload, c->gready, c->gidx, c->slot_row, c->items, c->ecount,
                    c->pf_xn, c->pf_log, c->pf_ids, c->fitems, c->fxh, c->fxq};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(c);
}

static int imax(int a, int b) { return a > b ? a : b; }

/* the model's dimensions as the context uses them */
static void ctx_dims(mmoe_ctx *c, const mmoe_model *m, int max_ctx) {
    const mmoe_config *cf = &m->cfg;
    c->m = m;
    c->max_ctx = max_ctx;
    c->batch = max_ctx < MMOE_BATCH_MAX ? max_ctx : MMOE_BATCH_MAX; /* no chunk can hold more than max_ctx */
    c->D = (int)cf->d_model;
    c->H = (int)cf->n_heads;
    c->KV = (int)cf->n_kv_heads;
    c->hd = (int)cf->head_dim;
    c->QD = c->H * c->hd;
    c->KVD = c->KV * c->hd;
    c->E = (int)cf->n_experts;
    c->K = (int)cf->top_k;
    /* FFN widths from the bound tensors, not from header fields a layer does not use (a dense model's
     * expert_ffn_dim, an all-MoE model's ffn_dim): buffers are sized only by what the file really holds */
    c->Fmax = 32;
    for (uint32_t l = 0; l < cf->n_layers; l++) {
        const mmoe_layer *L = &m->layers[l];
        if (L->is_moe) c->Fmax = imax(c->Fmax, L->experts.F);
        if (L->has_shared) c->Fmax = imax(c->Fmax, L->sh_down.cols);
    }
    c->Kmax = imax(imax(c->D, c->QD), c->Fmax);
}

/* Every buffer of a context and its size, in one table: ctx_new allocates it, mmoe_min_budget adds it up. */
typedef struct {
    void **p;
    size_t n;
} ctx_buf;
#define CTX_BUFS 64 /* >= the BUF lines below (47 today) */
static int ctx_bufs(mmoe_ctx *c, int n_threads, ctx_buf *b) {
    const mmoe_config *cf = &c->m->cfg;
    size_t B = (size_t)c->batch, D = (size_t)c->D, kv = (size_t)cf->n_layers * (size_t)c->max_ctx * (size_t)c->KVD;
    size_t EK = c->E ? (size_t)c->E : 1, KK = c->K ? (size_t)c->K : 1, F = (size_t)c->Fmax, f = sizeof(float);
    int n = 0;
#define BUF(field, bytes) (b[n++] = (ctx_buf){(void **)&c->field, (bytes)})
    BUF(kc, kv * 2);
    BUF(vc, kv * 2);
    BUF(rope_inv, f * (size_t)c->hd / 2);
    BUF(x, f * B * D);
    BUF(xn, f * B * D);
    BUF(q, f * B * (size_t)c->QD);
    BUF(k, f * B * (size_t)c->KVD);
    BUF(v, f * B * (size_t)c->KVD);
    BUF(att, f * B * (size_t)c->QD);
    BUF(tmp, f * B * D);
    BUF(y, f * B * D);
    BUF(gu, f * B * 2 * F);
    BUF(hid, f * B * F);
    BUF(rlog, f * B * EK);
    BUF(scores, f * MMOE_ATT_SCR * (size_t)n_threads * (size_t)c->max_ctx);
    BUF(xq, B * (size_t)c->Kmax);
    BUF(hq, B * F);
    BUF(xs, f * B);
    BUF(hs, f * B);
    BUF(gates, f * B * KK);
    BUF(ids, sizeof(int32_t) * B * KK);
    BUF(gxq, B * KK * D);
    BUF(ghq, B * KK * F);
    BUF(gxs, f * B * KK);
    BUF(ghs, f * B * KK);
    BUF(ggu, f * B * KK * 2 * F);
    BUF(ghid, f * B * KK * F);
    BUF(gout, f * B * KK * D);
    BUF(gslot, sizeof(int) * B * KK);
    BUF(grow, sizeof(int) * B * KK);
    BUF(gcnt, sizeof(int) * B * KK);
    BUF(gpend, sizeof(int) * EK);
    BUF(gneed, sizeof(int) * EK);
    BUF(gncnt, sizeof(int) * EK);
    BUF(gpres, sizeof(int) * EK);
    BUF(gload, sizeof(int) * EK);
    BUF(gready, sizeof(int) * EK);
    BUF(gidx, sizeof(int) * EK);
    BUF(slot_row, sizeof(int) * B * KK);
    BUF(items, sizeof(mm_item) * (EK + 4));
    BUF(fitems, sizeof(fx_item) * (EK + 4));
    BUF(fxh, f * (size_t)n_threads * F);
    BUF(fxq, (size_t)n_threads * F);
    BUF(ecount, sizeof(uint64_t) * (size_t)cf->n_layers * EK);
    BUF(pf_xn, f * D);
    BUF(pf_log, f * EK);
    BUF(pf_ids, sizeof(int32_t) * KK);
#undef BUF
    return n;
}

static int ctx_clamp(const mmoe_model *m, int max_ctx) {
    return max_ctx <= 0 || (uint32_t)max_ctx > m->cfg.max_seq_len ? (int)m->cfg.max_seq_len : max_ctx;
}

/* Budget arithmetic (mmoe.h): what a context needs besides its expert slots, and what one more slot a layer
 * costs. The allowance covers what is not counted buffer by buffer: thread stacks and TLS (256 KiB a
 * thread), malloc headers and the caller's logits row. */
static uint64_t budget_base(const mmoe_model *m, int n_threads, int max_ctx, int io_threads) {
    mmoe_ctx t;
    memset(&t, 0, sizeof t);
    ctx_dims(&t, m, ctx_clamp(m, max_ctx));
    ctx_buf b[CTX_BUFS];
    int nb = ctx_bufs(&t, n_threads, b);
    uint64_t bytes = sizeof(mmoe_ctx);
    for (int i = 0; i < nb; i++) bytes += b[i].n + 32;
    uint64_t proc = m->open_rss ? m->open_rss : m->resident_bytes + (4u << 20); /* no /proc: an estimate */
    uint64_t allowance = (1u << 20) + (256u << 10) * (uint64_t)(n_threads + io_threads) +
                         4 * (uint64_t)m->cfg.vocab_size;
    return proc + bytes + mmoe_cache_meta_bytes(m, 0) + allowance;
}

static uint64_t budget_per_slot(const mmoe_model *m) {
    uint64_t nm = (uint64_t)mmoe_model_moe_layers(m);
    return nm * mmoe_cache_slot_bytes(m) + (mmoe_cache_meta_bytes(m, 1) - mmoe_cache_meta_bytes(m, 0));
}

int64_t mmoe_min_budget(const mmoe_model *m, int n_threads, int max_ctx, int io_threads) {
    if (io_threads <= 0) io_threads = MMOE_IO_THREADS_DEFAULT;
    if (n_threads < 1) n_threads = 1;
    int nm = mmoe_model_moe_layers(m);
    return (int64_t)(budget_base(m, n_threads, max_ctx, io_threads) + (nm ? m->cfg.top_k * budget_per_slot(m) : 0));
}

static mmoe_ctx *ctx_new(const mmoe_model *m, int n_threads, int max_ctx, int flags, char *err, size_t errlen) {
    const mmoe_config *cf = &m->cfg;
    if (n_threads < 1 || n_threads > 256) {
        mmoe_seterr(err, errlen, "threads must be in [1, 256], got %d", n_threads);
        return NULL;
    }
    max_ctx = ctx_clamp(m, max_ctx);
    mmoe_ctx *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    c->float_path = (flags & MMOE_FLOAT_PATH) != 0;
    c->ks = mmoe_kernels_best();
    if (!c->ks) {
        mmoe_seterr(err, errlen, "no usable kernel set (check MMOE_KERNELS)");
        free(c);
        return NULL;
    }
    /* the scalar kernel set also takes the scalar attention (bit-identical anyway: see attention.c) */
    c->att_impl = strcmp(c->ks->name, "scalar") ? mmoe_att_best_impl() : MMOE_ATT_SCALAR;
    ctx_dims(c, m, max_ctx);
    c->pool = mmoe_pool_new(n_threads);
    if (!c->pool) goto oom;
    ctx_buf b[CTX_BUFS];
    int nb = ctx_bufs(c, n_threads, b);
    for (int i = 0; i < nb; i++)
        if (!(*b[i].p = malloc(b[i].n))) goto oom;
    memset(c->ecount, 0, sizeof(uint64_t) * (size_t)cf->n_layers * (size_t)(c->E ? c->E : 1));
    /* inv_freq = 1 / theta^(2i / hd) in fp32, as torch computes it */
    for (int i = 0; i < c->hd / 2; i++)
        c->rope_inv[i] = 1.0f / powf(cf->rope_theta, (float)(2 * i) / (float)c->hd);
    return c;
oom:
    mmoe_ctx_free(c);
    mmoe_seterr(err, errlen, "out of memory allocating the context (max_ctx %d, %d threads)", max_ctx, n_threads);
    return NULL;
}

mmoe_ctx *mmoe_ctx_new(const mmoe_model *m, int n_threads, int max_ctx, int flags, char *err, size_t errlen) {
    if (m->stream) {
        mmoe_seterr(err, errlen, "this model streams its experts: create the context with mmoe_ctx_new_streaming");
        return NULL;
    }
    return ctx_new(m, n_threads, max_ctx, flags, err, errlen);
}

mmoe_ctx *mmoe_ctx_new_streaming(const mmoe_model *m, int n_threads, int max_ctx, int flags, uint64_t mem_budget,
                                 int policy, int io_threads, char *err, size_t errlen) {
    if (!m->stream) {
        mmoe_seterr(err, errlen, "a memory budget needs a model opened with mmoe_model_open_streaming");
        return NULL;
    }
    if (io_threads <= 0) io_threads = MMOE_IO_THREADS_DEFAULT;
    if (n_threads < 1 || n_threads > 256) {
        mmoe_seterr(err, errlen, "threads must be in [1, 256], got %d", n_threads);
        return NULL;
    }
    uint64_t min = (uint64_t)mmoe_min_budget(m, n_threads, max_ctx, io_threads);
    if (mem_budget < min) {
        const double MB = 1024.0 * 1024.0;
        mmoe_seterr(err, errlen,
                    "memory budget %.1f MB is below the minimum %.1f MB for this model and context (the process "
                    "once the model was open: %.1f MB, %.1f MB of it resident weights; + KV cache and buffers; "
                    "+ %u expert slots a layer)",
                    mem_budget / MB, min / MB, m->open_rss / MB, m->resident_bytes / MB, m->cfg.top_k);
        return NULL;
    }
    int nm = mmoe_model_moe_layers(m), S = 0;
    if (nm) {
        uint64_t s = (mem_budget - budget_base(m, n_threads, max_ctx, io_threads)) / budget_per_slot(m);
        S = s > m->cfg.n_experts ? (int)m->cfg.n_experts : (int)s;
    }
    mmoe_ctx *c = ctx_new(m, n_threads, max_ctx, flags, err, errlen);
    if (!c) return NULL;
    c->cache = mmoe_cache_new(m, S, policy, io_threads, err, errlen);
    if (!c->cache) {
        mmoe_ctx_free(c);
        return NULL;
    }
    c->budget = mem_budget;
    c->min_budget = min;
    return c;
}

int mmoe_cache_stats(const mmoe_ctx *c, uint64_t *out) {
    if (!c->cache) return -1;
    mmoe_cache_stats_get(c->cache, out);
    out[MMOE_CS_BUDGET] = c->budget;
    out[MMOE_CS_MIN_BUDGET] = c->min_budget;
    out[MMOE_CS_PREFETCH] = (uint64_t)c->prefetch;
    return 0;
}

int mmoe_ctx_set_prefetch(mmoe_ctx *c, int on) {
    if (!c->cache) return -1;
    c->prefetch = on != 0;
    return 0;
}

void mmoe_cache_stats_reset(mmoe_ctx *c) {
    if (c->cache) mmoe_cache_stats_clear(c->cache);
}

void mmoe_ctx_reset(mmoe_ctx *c) { c->pos = 0; }
int mmoe_ctx_pos(const mmoe_ctx *c) { return c->pos; }
const char *mmoe_ctx_kernels(const mmoe_ctx *c) { return c->float_path ? "float" : c->ks->name; }
void mmoe_profile_get(const mmoe_ctx *c, double *s) { memcpy(s, c->t, sizeof c->t); }
void mmoe_profile_reset(mmoe_ctx *c) { memset(c->t, 0, sizeof c->t); }
void mmoe_expert_counts(const mmoe_ctx *c, uint64_t *counts) {
    memcpy(counts, c->ecount, sizeof(uint64_t) * c->m->cfg.n_layers * (size_t)c->E);
}
void mmoe_expert_counts_reset(mmoe_ctx *c) {
    memset(c->ecount, 0, sizeof(uint64_t) * c->m->cfg.n_layers * (size_t)c->E);
}
