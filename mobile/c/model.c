/* The forward pass: prefill (a prompt in chunks of MMOE_BATCH tokens as one batch) and decode (one token),
 * fp16 KV cache, GQA attention, RoPE (rotate-half, as model/model.py), RMSNorm, SwiGLU, fp32 router with
 * top-k + renormalisation + selection-only bias, shared experts, routed experts computed only for the
 * selected ones (a decode step reads only their INT4 records). Every quantized matmul input is quantized
 * per token to int8 exactly as model/quant.py does, then goes through the kernels of kernels.h. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define MMOE_BATCH 32

const char *const mmoe_timer_names[MMOE_T_COUNT] = {"attention", "router", "experts", "shared", "lm_head", "other"};

struct mmoe_ctx {
    const mmoe_model *m;
    mmoe_pool *pool;
    const mmoe_kernel_set *ks;
    int float_path, max_ctx, pos;
    int D, H, KV, hd, QD, KVD, E, K, Fmax, Kmax;
    uint16_t *kc, *vc;   /* [layer][max_ctx][KVD] fp16 */
    float *rope_inv;     /* hd / 2 */
    float *x, *xn, *q, *k, *v, *att, *tmp, *y, *gu, *hid, *rlog, *slot, *scores;
    int8_t *xq, *hq;
    float *xs, *hs, *gates;
    int32_t *ids;
    /* routed-expert gather buffers (tokens of one expert) */
    int8_t *gxq, *ghq;
    float *gxs, *ghs, *ggu, *ghid, *gout;
    int *gslot;
    double t[MMOE_T_COUNT];
};

/* Exact fp16 -> fp32 (same values as mmoe_fp16_to_f32; inlined for the attention inner loops). */
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
    float f;
    if (exp == 0) {
        f = (float)mant * 0x1p-24f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- matmul over threads ------------------------------------------------------------------------------- */
typedef struct {
    const mmoe_ctx *c;
    const mmoe_q4_matrix *W;
    const int8_t *Xq;
    const float *xs;
    int M, ldy;
    float *Y;
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

static void mm_task(void *arg, int t, int nt) {
    const mm_job *j = arg;
    int R = j->W->rows;
    int r0 = (int)((long)R * t / nt) & ~7, r1 = t == nt - 1 ? R : (int)((long)R * (t + 1) / nt) & ~7;
    if (r1 <= r0) return;
    if (j->c->float_path) {
        for (int m = 0; m < j->M; m++)
            float_rows(j->W, j->Xq + (size_t)m * j->W->cols, j->xs[m], j->Y + (size_t)m * j->ldy + r0, r0, r1);
    } else if (j->M == 1) {
        j->c->ks->gemv(j->W, j->Xq, j->xs[0], j->Y + r0, r0, r1);
    } else {
        j->c->ks->gemm(j->W, j->Xq, j->xs, j->M, j->Y + r0, j->ldy, r0, r1);
    }
}

/* Y[m * ldy + r] = W row r . dequant(Xq row m) for m < M */
static void matmul(mmoe_ctx *c, const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy) {
    mm_job j = {c, W, Xq, xs, M, ldy, Y};
    int nt = mmoe_pool_size(c->pool);
    if (W->rows < 64 * nt) nt = W->rows / 64 > 0 ? W->rows / 64 : 1; /* tiny matrices: fewer threads */
    mmoe_pool_run(c->pool, mm_task, &j, nt);
}

static void quantize_rows(const float *x, int8_t *q, float *s, int M, int K) {
    for (int m = 0; m < M; m++) s[m] = mmoe_quantize_row_q8(x + (size_t)m * K, q + (size_t)m * K, K);
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
typedef struct {
    mmoe_ctx *c;
    int layer, n;
} att_job;

static void att_task(void *arg, int t, int nt) {
    const att_job *j = arg;
    mmoe_ctx *c = j->c;
    int H = c->H, hd = c->hd, grp = c->H / c->KV, total = j->n * H;
    float *sc = c->scores + (size_t)t * c->max_ctx;
    const uint16_t *kc = c->kc + (size_t)j->layer * c->max_ctx * c->KVD;
    const uint16_t *vc = c->vc + (size_t)j->layer * c->max_ctx * c->KVD;
    float scale = 1.0f / sqrtf((float)hd);
    for (int w = total * t / nt; w < total * (t + 1) / nt; w++) {
        int tok = w / H, h = w % H, p = c->pos + tok, kvh = h / grp;
        const float *q = c->q + (size_t)tok * c->QD + (size_t)h * hd;
        float mx = -INFINITY;
        for (int s = 0; s <= p; s++) {
            const uint16_t *kr = kc + (size_t)s * c->KVD + (size_t)kvh * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += q[d] * h2f(kr[d]);
            sc[s] = dot * scale;
            if (sc[s] > mx) mx = sc[s];
        }
        float sum = 0.0f;
        for (int s = 0; s <= p; s++) {
            sc[s] = expf(sc[s] - mx);
            sum += sc[s];
        }
        float *o = c->att + (size_t)tok * c->QD + (size_t)h * hd;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (int s = 0; s <= p; s++) {
            const uint16_t *vr = vc + (size_t)s * c->KVD + (size_t)kvh * hd;
            float pr = sc[s] / sum;
            for (int d = 0; d < hd; d++) o[d] += pr * h2f(vr[d]);
        }
    }
}

/* ---- router: scores, top-k with the selection bias, renormalised gates ----------------------------------- */
static void route(mmoe_ctx *c, const mmoe_layer *L, int n) {
    const mmoe_config *cf = &c->m->cfg;
    int E = c->E, K = c->K, D = c->D;
    for (int t = 0; t < n; t++) {
        const float *x = c->xn + (size_t)t * D;
        float *lg = c->rlog + (size_t)t * E;
        for (int e = 0; e < E; e++) {
            const float *w = L->router + (size_t)e * D;
            float acc = 0.0f;
            for (int i = 0; i < D; i++) acc += x[i] * w[i];
            lg[e] = acc;
        }
        if (cf->router_score == 0) { /* softmax */
            float mx = lg[0], sum = 0.0f;
            for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
            for (int e = 0; e < E; e++) sum += (lg[e] = expf(lg[e] - mx));
            for (int e = 0; e < E; e++) lg[e] /= sum;
        } else {
            for (int e = 0; e < E; e++) lg[e] = 1.0f / (1.0f + expf(-lg[e]));
        }
        int32_t *ids = c->ids + (size_t)t * K;
        float *g = c->gates + (size_t)t * K, gsum = 0.0f;
        for (int k = 0; k < K; k++) { /* k-th largest selection score; ties -> lower expert id */
            int best = -1;
            float bv = 0.0f;
            for (int e = 0; e < E; e++) {
                int used = 0;
                for (int kk = 0; kk < k; kk++) used |= ids[kk] == e;
                float v = lg[e] + L->expert_bias[e];
                if (!used && (best < 0 || v > bv)) {
                    best = e;
                    bv = v;
                }
            }
            ids[k] = best;
            g[k] = lg[best];
            gsum += g[k];
        }
        if (cf->norm_topk_prob) {
            if (gsum < 1e-20f) gsum = 1e-20f;
            for (int k = 0; k < K; k++) g[k] /= gsum;
        }
    }
}

static mmoe_q4_matrix expert_mat(const mmoe_experts *x, int e, int down) {
    const uint8_t *p = x->base + (size_t)e * x->rec_bytes + (down ? x->down_off : 0);
    int rows = down ? x->D : 2 * x->F, cols = down ? x->F : x->D;
    mmoe_q4_matrix m = {p, (const mmoe_fp16 *)(const void *)(p + (size_t)rows * cols / 2), rows, cols};
    return m;
}

/* Routed experts: for each expert, gather the token-slots that picked it and run it as one small batch. */
static void experts(mmoe_ctx *c, const mmoe_layer *L, int n) {
    int D = c->D, K = c->K, F = L->experts.F;
    for (int e = 0; e < c->E; e++) {
        int cnt = 0;
        for (int s = 0; s < n * K; s++)
            if (c->ids[s] == e) {
                int t = s / K;
                memcpy(c->gxq + (size_t)cnt * D, c->xq + (size_t)t * D, (size_t)D);
                c->gxs[cnt] = c->xs[t];
                c->gslot[cnt++] = s;
            }
        if (!cnt) continue;
        mmoe_q4_matrix gu = expert_mat(&L->experts, e, 0), dn = expert_mat(&L->experts, e, 1);
        matmul(c, &gu, c->gxq, c->gxs, cnt, c->ggu, 2 * F);
        for (int i = 0; i < cnt; i++) swiglu(c->ggu + (size_t)i * 2 * F, c->ghid + (size_t)i * F, F);
        quantize_rows(c->ghid, c->ghq, c->ghs, cnt, F);
        matmul(c, &dn, c->ghq, c->ghs, cnt, c->gout, D);
        for (int i = 0; i < cnt; i++) memcpy(c->slot + (size_t)c->gslot[i] * D, c->gout + (size_t)i * D, sizeof(float) * D);
    }
    for (int t = 0; t < n; t++) { /* sum the K slots in slot order, as the PyTorch reference does */
        float *y = c->y + (size_t)t * D;
        for (int i = 0; i < D; i++) y[i] = 0.0f;
        for (int k = 0; k < K; k++) {
            const float *o = c->slot + ((size_t)t * K + k) * D;
            float g = c->gates[(size_t)t * K + k];
            for (int i = 0; i < D; i++) y[i] += o[i] * g;
        }
    }
}

/* SwiGLU FFN (shared expert or dense FFN) on the already-quantized c->xq; result in c->tmp */
static void ffn(mmoe_ctx *c, const mmoe_q4_matrix *gu, const mmoe_q4_matrix *dn, int n) {
    int F = dn->cols;
    matmul(c, gu, c->xq, c->xs, n, c->gu, 2 * F);
    for (int t = 0; t < n; t++) swiglu(c->gu + (size_t)t * 2 * F, c->hid + (size_t)t * F, F);
    quantize_rows(c->hid, c->hq, c->hs, n, F);
    matmul(c, dn, c->hq, c->hs, n, c->tmp, c->D);
}

static void forward_chunk(mmoe_ctx *c, const int32_t *ids, int n, float *logits, int all_logits) {
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
        quantize_rows(c->xn, c->xq, c->xs, n, D);
        matmul(c, &L->wq, c->xq, c->xs, n, c->q, c->QD);
        matmul(c, &L->wk, c->xq, c->xs, n, c->k, c->KVD);
        matmul(c, &L->wv, c->xq, c->xs, n, c->v, c->KVD);
        for (int t = 0; t < n; t++) {
            rope(c, c->q + (size_t)t * c->QD, c->H, c->pos + t);
            rope(c, c->k + (size_t)t * c->KVD, c->KV, c->pos + t);
            size_t at = ((size_t)l * c->max_ctx + (size_t)(c->pos + t)) * c->KVD;
            for (int i = 0; i < c->KVD; i++) {
                c->kc[at + i] = mmoe_f32_to_fp16(c->k[(size_t)t * c->KVD + i]);
                c->vc[at + i] = mmoe_f32_to_fp16(c->v[(size_t)t * c->KVD + i]);
            }
        }
        att_job aj = {c, (int)l, n};
        mmoe_pool_run(c->pool, att_task, &aj, mmoe_pool_size(c->pool));
        quantize_rows(c->att, c->xq, c->xs, n, c->QD);
        matmul(c, &L->wo, c->xq, c->xs, n, c->tmp, D);
        for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->tmp[i];
        t1 = now();
        c->t[MMOE_T_ATTENTION] += t1 - t0;
        t0 = t1;
        for (int t = 0; t < n; t++) rmsnorm(c->x + (size_t)t * D, L->ffn_norm, c->xn + (size_t)t * D, D, cf->norm_eps);
        quantize_rows(c->xn, c->xq, c->xs, n, D);
        if (L->is_moe) {
            route(c, L, n);
            t1 = now();
            c->t[MMOE_T_ROUTER] += t1 - t0;
            t0 = t1;
            experts(c, L, n);
            t1 = now();
            c->t[MMOE_T_EXPERTS] += t1 - t0;
            t0 = t1;
            if (L->has_shared) {
                ffn(c, &L->sh_gate_up, &L->sh_down, n);
                for (size_t i = 0; i < (size_t)n * D; i++) c->y[i] += c->tmp[i];
            }
            for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->y[i];
            c->t[MMOE_T_SHARED] += now() - t0;
        } else { /* a dense layer's FFN counts as "experts" (the FFN the routed experts replace) */
            ffn(c, &L->sh_gate_up, &L->sh_down, n);
            for (size_t i = 0; i < (size_t)n * D; i++) c->x[i] += c->tmp[i];
            c->t[MMOE_T_EXPERTS] += now() - t0;
        }
    }
    t0 = now();
    int first = all_logits ? 0 : n - 1, cnt = n - first;
    for (int t = first; t < n; t++) rmsnorm(c->x + (size_t)t * D, m->norm, c->xn + (size_t)(t - first) * D, D, cf->norm_eps);
    quantize_rows(c->xn, c->xq, c->xs, cnt, D);
    t1 = now();
    c->t[MMOE_T_OTHER] += t1 - t0;
    if (logits) matmul(c, &m->lm_head, c->xq, c->xs, cnt, logits, (int)cf->vocab_size);
    c->t[MMOE_T_LM_HEAD] += now() - t1;
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
    for (int s = 0; s < n; s += MMOE_BATCH) {
        int cnt = n - s < MMOE_BATCH ? n - s : MMOE_BATCH;
        float *out = NULL;
        if (all_logits) out = logits + (size_t)s * V;
        else if (s + cnt == n) out = logits;
        forward_chunk(c, ids + s, cnt, out, all_logits);
        c->pos += cnt;
    }
    return 0;
}

/* ---- context --------------------------------------------------------------------------------------------- */
void mmoe_ctx_free(mmoe_ctx *c) {
    if (!c) return;
    if (c->pool) mmoe_pool_free(c->pool);
    void *bufs[] = {c->kc, c->vc, c->rope_inv, c->x, c->xn, c->q, c->k, c->v, c->att, c->tmp, c->y, c->gu, c->hid,
                    c->rlog, c->slot, c->scores, c->xq, c->hq, c->xs, c->hs, c->gates, c->ids, c->gxq, c->ghq,
                    c->gxs, c->ghs, c->ggu, c->ghid, c->gout, c->gslot};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(c);
}

static int imax(int a, int b) { return a > b ? a : b; }

mmoe_ctx *mmoe_ctx_new(const mmoe_model *m, int n_threads, int max_ctx, int flags, char *err, size_t errlen) {
    const mmoe_config *cf = &m->cfg;
    if (n_threads < 1 || n_threads > 256) {
        mmoe_seterr(err, errlen, "threads must be in [1, 256], got %d", n_threads);
        return NULL;
    }
    if (max_ctx <= 0 || (uint32_t)max_ctx > cf->max_seq_len) max_ctx = (int)cf->max_seq_len;
    mmoe_ctx *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    c->m = m;
    c->float_path = (flags & MMOE_FLOAT_PATH) != 0;
    c->ks = mmoe_kernels_best();
    if (!c->ks) {
        mmoe_seterr(err, errlen, "no usable kernel set (check MMOE_KERNELS)");
        free(c);
        return NULL;
    }
    c->max_ctx = max_ctx;
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
    size_t B = MMOE_BATCH, D = (size_t)c->D, kv = (size_t)cf->n_layers * (size_t)max_ctx * (size_t)c->KVD;
    size_t EK = c->E ? (size_t)c->E : 1, KK = c->K ? (size_t)c->K : 1, F = (size_t)c->Fmax;
    c->pool = mmoe_pool_new(n_threads);
    c->kc = malloc(kv * 2);
    c->vc = malloc(kv * 2);
    c->rope_inv = malloc(sizeof(float) * (size_t)c->hd / 2);
    c->x = malloc(sizeof(float) * B * D);
    c->xn = malloc(sizeof(float) * B * D);
    c->q = malloc(sizeof(float) * B * (size_t)c->QD);
    c->k = malloc(sizeof(float) * B * (size_t)c->KVD);
    c->v = malloc(sizeof(float) * B * (size_t)c->KVD);
    c->att = malloc(sizeof(float) * B * (size_t)c->QD);
    c->tmp = malloc(sizeof(float) * B * D);
    c->y = malloc(sizeof(float) * B * D);
    c->gu = malloc(sizeof(float) * B * 2 * F);
    c->hid = malloc(sizeof(float) * B * F);
    c->rlog = malloc(sizeof(float) * B * EK);
    c->slot = malloc(sizeof(float) * B * KK * D);
    c->scores = malloc(sizeof(float) * (size_t)n_threads * (size_t)max_ctx);
    c->xq = malloc(B * (size_t)c->Kmax);
    c->hq = malloc(B * F);
    c->xs = malloc(sizeof(float) * B);
    c->hs = malloc(sizeof(float) * B);
    c->gates = malloc(sizeof(float) * B * KK);
    c->ids = malloc(sizeof(int32_t) * B * KK);
    c->gxq = malloc(B * KK * D);
    c->ghq = malloc(B * KK * F);
    c->gxs = malloc(sizeof(float) * B * KK);
    c->ghs = malloc(sizeof(float) * B * KK);
    c->ggu = malloc(sizeof(float) * B * KK * 2 * F);
    c->ghid = malloc(sizeof(float) * B * KK * F);
    c->gout = malloc(sizeof(float) * B * KK * D);
    c->gslot = malloc(sizeof(int) * B * KK);
    void *bufs[] = {c->pool, c->kc, c->vc, c->rope_inv, c->x, c->xn, c->q, c->k, c->v, c->att, c->tmp, c->y, c->gu,
                    c->hid, c->rlog, c->slot, c->scores, c->xq, c->hq, c->xs, c->hs, c->gates, c->ids, c->gxq, c->ghq,
                    c->gxs, c->ghs, c->ggu, c->ghid, c->gout, c->gslot};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (!bufs[i]) goto oom;
    /* inv_freq = 1 / theta^(2i / hd) in fp32, as torch computes it */
    for (int i = 0; i < c->hd / 2; i++)
        c->rope_inv[i] = 1.0f / powf(cf->rope_theta, (float)(2 * i) / (float)c->hd);
    return c;
oom:
    mmoe_ctx_free(c);
    mmoe_seterr(err, errlen, "out of memory allocating the context (max_ctx %d, %d threads)", max_ctx, n_threads);
    return NULL;
}

void mmoe_ctx_reset(mmoe_ctx *c) { c->pos = 0; }
int mmoe_ctx_pos(const mmoe_ctx *c) { return c->pos; }
const char *mmoe_ctx_kernels(const mmoe_ctx *c) { return c->float_path ? "float" : c->ks->name; }
void mmoe_profile_get(const mmoe_ctx *c, double *s) { memcpy(s, c->t, sizeof c->t); }
void mmoe_profile_reset(mmoe_ctx *c) { memset(c->t, 0, sizeof c->t); }
