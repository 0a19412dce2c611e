/* Attention over the fp16 KV cache and the router dot products (fp32 or fp16 weights), with one fixed arithmetic order that a
 * scalar reference, AVX2+F16C and NEON all reproduce bit for bit (no FMA: mul then add, -ffp-contract=off):
 *
 *   dot(a, b, n): 8 lane accumulators, lane l sums a[i]*b[i] for i = l, l+8, ... over the first n8 = n & ~7
 *   elements in order; then ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)) — the AVX2 / NEON horizontal-sum tree —
 *   then the tail i = n8 .. n-1 added one by one.
 *   head attention: sc[s] = dot(q, K[s]) * scale; max; sc[s] = expf(sc[s] - max) summed in s order;
 *   o[d] = sum over s in order of (sc[s] / sum) * V[s][d]   (element-wise, so SIMD over d changes nothing).
 *
 * Because every implementation computes the same values, the results do not depend on the kernel set, the ISA
 * or the thread split: x86 and ARM engines stay token-identical, and the scalar set stays a bit-exact reference. */
#include <math.h>
#include <string.h>

#include "attention.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define MMOE_ATT_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define MMOE_ATT_NEON 1
#endif

/* Exact fp16 -> fp32 (same values as mmoe_fp16_to_f32 / F16C / FCVTL). */
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

static inline float reduce8(const float l[8]) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

/* ---- scalar reference ------------------------------------------------------------------------------------ */
static float dot_f32_scalar(const float *a, const float *b, int n) {
    float l[8] = {0};
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8)
        for (int j = 0; j < 8; j++) l[j] = l[j] + a[i + j] * b[i + j];
    float acc = reduce8(l);
    for (; i < n; i++) acc = acc + a[i] * b[i];
    return acc;
}

static float dot_f16_scalar(const float *q, const uint16_t *k, int n) {
    float l[8] = {0};
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8)
        for (int j = 0; j < 8; j++) l[j] = l[j] + q[i + j] * h2f(k[i + j]);
    float acc = reduce8(l);
    for (; i < n; i++) acc = acc + q[i] * h2f(k[i]);
    return acc;
}

static void axpy_f16_scalar(float *o, float p, const uint16_t *v, int n) {
    for (int d = 0; d < n; d++) o[d] = o[d] + p * h2f(v[d]);
}

/* ---- shared by the SIMD group kernels ---------------------------------------------------------------- */
/* Prefetch the hd fp16 values of the key/value row ATT_PF_KEYS rows ahead: at context 1024 the cache (37 MB for
 * S) comes from DRAM, and each row is used the moment it is loaded. asm, not _mm_prefetch (see kernels_avx2.c);
 * integer addresses, because the row may lie past the cache (prefetch never faults). */
#define ATT_PF_KEYS 16
static inline void att_prefetch_row(uintptr_t p, int hd) {
#if defined(MMOE_ATT_X86)
    for (int b = 0; b < 2 * hd; b += 64) __asm__ volatile("prefetcht0 (%0)" : : "r"(p + (uintptr_t)b));
#elif defined(MMOE_ATT_NEON)
    for (int b = 0; b < 2 * hd; b += 64) __asm__ volatile("prfm pldl1keep, [%0]" : : "r"(p + (uintptr_t)b));
#else
    (void)p;
    (void)hd;
#endif
}
/* Each of nh score rows (n_keys apart) in place: expf(sc - max) summed in key order, then divided by that sum:
 * the p = sc / sum of mmoe_att_head, the same value for every implementation. */
/* The first half of a softmax row of mmoe_att_head: scr[s] = expf(scr[s] - mx), summed in key order (the SIMD
 * rows below share it and only vectorise the division). */
static inline float att_exp_sum(float *scr, int n_keys, float mx) {
    float sum = 0.0f;
    for (int s = 0; s < n_keys; s++) {
        scr[s] = expf(scr[s] - mx);
        sum += scr[s];
    }
    return sum;
}

/* One softmax row of mmoe_att_head: expf(sc - max) summed in key order, then divided by that sum. */
static inline void att_softmax_row(float *scr, int n_keys, float mx) {
    float sum = att_exp_sum(scr, n_keys, mx);
    for (int s = 0; s < n_keys; s++) scr[s] = scr[s] / sum;
}

static inline void att_softmax_rows(float *sc, int nh, int n_keys, const float *mx) {
    for (int j = 0; j < nh; j++) att_softmax_row(sc + (size_t)j * n_keys, n_keys, mx[j]);
}
#define ATT_H2(X) X(0) X(1)
#define ATT_H4(X) X(0) X(1) X(2) X(3)


/* ---- query tiles (prefill: mmoe_att_block) ------------------------------------------------------------------
 * A tile is up to MMOE_ATT_TILE rows, each one (query token, query head) of the same KV head, with its own key
 * count nk[r] (causal: nk of a later token is larger). Each fp16 key and value row is converted once per tile
 * (8 rows) instead of once per query token's group, and the 8 independent dot chains hide the add latency.
 * Per row the values are exactly mmoe_att_head's: the score is the same 8-lane sum and tree times scale, the
 * maximum is taken over s < nk[r] in key order, the softmax is att_softmax_row, and each output element is the
 * in-order sum over s < nk[r] of p[s] * v[s][d] starting from +0. Keys nk[r] <= s < max nk are dotted too (the
 * tile shares the loop) but their scores are dropped, and the weighted sum skips them, so they change nothing.
 * Skeleton for hd % 8 == 0; P##T_SOFTMAX (att_softmax_row's values), P##T_DECL_ACC / P##_LOAD_K / P##T_DOT_STEP / P##T_DOT_STORE for the scores,
 * P##T_DECL_OUT / P##T_LOAD_V / P##T_AXPY / P##T_OUT_STORE for the weighted sum of values (8 dims a pass). */
#define ATT_R1(X) X(0)
#define ATT_R2(X) ATT_R1(X) X(1)
#define ATT_R3(X) ATT_R2(X) X(2)
#define ATT_R4(X) ATT_R3(X) X(3)
#define ATT_R5(X) ATT_R4(X) X(4)
#define ATT_R6(X) ATT_R5(X) X(5)
#define ATT_R7(X) ATT_R6(X) X(6)
#define ATT_R8(X) ATT_R7(X) X(7)
typedef void (*att_tile_fn)(const float *const *qr, float *const *orow, const int *nk, const uint16_t *kc,
                            const uint16_t *vc, size_t stride, int hd, float scale, float *sc);
#define ATT_TILE_SCORE(r, SUM)                                                                                    \
    {                                                                                                             \
        float x = (SUM) * scale;                                                                                  \
        if (s < nk[r]) {                                                                                          \
            sc[(size_t)(r) * ld + s] = x;                                                                         \
            if (x > mx[r]) mx[r] = x;                                                                             \
        }                                                                                                         \
    }
#define ATT_TILE_AXPY_IF(P, r)                                                                                    \
    if (s < nk[r]) P##T_AXPY(r)
#define ATT_TILE(NAME, RT, ATTR, P)                                                                               \
    ATTR static void NAME(const float *const *qr, float *const *orow, const int *nk, const uint16_t *kc,          \
                          const uint16_t *vc, size_t stride, int hd, float scale, float *sc) {                   \
        int nmin = nk[0], nmax = nk[0];                                                                           \
        float mx[RT];                                                                                             \
        for (int r = 0; r < RT; r++) {                                                                            \
            nmin = nk[r] < nmin ? nk[r] : nmin;                                                                   \
            nmax = nk[r] > nmax ? nk[r] : nmax;                                                                   \
            mx[r] = -INFINITY;                                                                                    \
        }                                                                                                         \
        size_t ld = (size_t)nmax;                                                                                 \
        for (int s = 0; s < nmax; s++) {                                                                          \
            const uint16_t *k = kc + (size_t)s * stride;                                                          \
            att_prefetch_row((uintptr_t)k + ATT_PF_KEYS * stride * 2, hd);                                        \
            ATT_R##RT(P##T_DECL_ACC)                                                                              \
            for (int i = 0; i < hd; i += 8) {                                                                     \
                P##_LOAD_K(k + i)                                                                                 \
                ATT_R##RT(P##T_DOT_STEP)                                                                          \
            }                                                                                                     \
            ATT_R##RT(P##T_DOT_STORE)                                                                             \
        }                                                                                                         \
        for (int r = 0; r < RT; r++) P##T_SOFTMAX(sc + (size_t)r * ld, nk[r], mx[r]);                             \
        for (int d = 0; d < hd; d += 8) {                                                                         \
            ATT_R##RT(P##T_DECL_OUT)                                                                              \
            const uint16_t *v = vc + d;                                                                           \
            int s = 0;                                                                                            \
            for (; s < nmin; s++, v += stride) {                                                                  \
                if (d == 0) att_prefetch_row((uintptr_t)v + ATT_PF_KEYS * stride * 2, hd);                        \
                P##T_LOAD_V(v)                                                                                    \
                ATT_R##RT(P##T_AXPY)                                                                              \
            }                                                                                                     \
            for (; s < nmax; s++, v += stride) {                                                                  \
                P##T_LOAD_V(v)                                                                                    \
                ATT_R##RT(P##T_AXPY_IF)                                                                           \
            }                                                                                                     \
            ATT_R##RT(P##T_OUT_STORE)                                                                             \
        }                                                                                                         \
    }
#define ATT_TILES(PREFIX, ATTR, P)                                                                                \
    ATT_TILE(PREFIX##1, 1, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##2, 2, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##3, 3, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##4, 4, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##5, 5, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##6, 6, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##7, 7, ATTR, P)                                                                               \
    ATT_TILE(PREFIX##8, 8, ATTR, P)                                                                               \
    static const att_tile_fn PREFIX##s[MMOE_ATT_TILE + 1] = {NULL,       PREFIX##1, PREFIX##2, PREFIX##3,        \
                                                             PREFIX##4,  PREFIX##5, PREFIX##6, PREFIX##7,        \
                                                             PREFIX##8};

/* The tile in plain C, the twin of the SIMD tiles: the same per-row arithmetic (dot_f16_scalar's lanes, with
 * each key element converted once for the tile's rows). */
static void att_tile_scalar(const float *const *qr, float *const *orow, const int *nk, int rt, const uint16_t *kc,
                            const uint16_t *vc, size_t stride, int hd, float scale, float *sc) {
    int nmin = nk[0], nmax = nk[0], n8 = hd & ~7;
    float mx[MMOE_ATT_TILE], l[MMOE_ATT_TILE][8];
    for (int r = 0; r < rt; r++) {
        nmin = nk[r] < nmin ? nk[r] : nmin;
        nmax = nk[r] > nmax ? nk[r] : nmax;
        mx[r] = -INFINITY;
    }
    size_t ld = (size_t)nmax;
    for (int s = 0; s < nmax; s++) {
        const uint16_t *k = kc + (size_t)s * stride;
        memset(l, 0, sizeof l);
        for (int i = 0; i < n8; i += 8) {
            float kf[8];
            for (int j = 0; j < 8; j++) kf[j] = h2f(k[i + j]);
            for (int r = 0; r < rt; r++)
                for (int j = 0; j < 8; j++) l[r][j] = l[r][j] + qr[r][i + j] * kf[j];
        }
        for (int r = 0; r < rt; r++) {
            float acc = reduce8(l[r]);
            for (int i = n8; i < hd; i++) acc = acc + qr[r][i] * h2f(k[i]);
            float x = acc * scale;
            if (s < nk[r]) {
                sc[(size_t)r * ld + s] = x;
                if (x > mx[r]) mx[r] = x;
            }
        }
    }
    for (int r = 0; r < rt; r++) att_softmax_row(sc + (size_t)r * ld, nk[r], mx[r]);
    for (int r = 0; r < rt; r++)
        for (int d = 0; d < hd; d++) orow[r][d] = 0.0f;
    for (int s = 0; s < nmax; s++) {
        const uint16_t *v = vc + (size_t)s * stride;
        for (int d = 0; d < hd; d++) {
            float vf = h2f(v[d]);
            for (int r = 0; r < rt; r++)
                if (s < nk[r]) orow[r][d] = orow[r][d] + sc[(size_t)r * ld + s] * vf;
        }
    }
}

/* A whole GQA group of NH heads in one function, for hd % 16 == 0 (every real head size), with every accumulator
 * in a register: the per-key dots4/axpys4 calls below kept theirs on the stack (GCC -O2 does not unroll the head
 * loop) and paid a function-pointer call per key, which made attention at context 1024 cost more than streaming
 * the weights (S decode 16.7 tok/s at context 1024 vs 60 at context 0, one thread, dev VM). Same values: each
 * head's score is the same 8-lane sum and tree, the softmax the same sequence, and each output element the same
 * in-order sum over keys of (sc / sum) * v; only the loop nesting differs (keys inside blocks of 16 dims).
 * One skeleton for every ISA; P names the ISA's pieces: P##_DECL_ACC / P##_LOAD_K / P##_DOT_STEP / P##_DOT_STORE
 * for the scores, P##_DECL_OUT / P##_LOAD_V / P##_AXPY_STEP / P##_OUT_STORE for the weighted sum of values. */
#define ATT_GROUP(NAME, NH, ATTR, P)                                                                              \
    ATTR static void NAME(const float *q, const uint16_t *kc, const uint16_t *vc, size_t stride, int n_keys,      \
                          int hd, float scale, float *sc, float *o) {                                            \
        float mx[NH];                                                                                             \
        for (int j = 0; j < NH; j++) mx[j] = -INFINITY;                                                           \
        for (int s = 0; s < n_keys; s++) {                                                                        \
            const uint16_t *k = kc + (size_t)s * stride;                                                          \
            att_prefetch_row((uintptr_t)k + ATT_PF_KEYS * stride * 2, hd);                                        \
            ATT_H##NH(P##_DECL_ACC)                                                                               \
            for (int i = 0; i < hd; i += 8) {                                                                     \
                P##_LOAD_K(k + i)                                                                                 \
                ATT_H##NH(P##_DOT_STEP)                                                                           \
            }                                                                                                     \
            ATT_H##NH(P##_DOT_STORE)                                                                              \
        }                                                                                                         \
        att_softmax_rows(sc, NH, n_keys, mx);                                                                     \
        for (int d = 0; d < hd; d += 16) {                                                                        \
            ATT_H##NH(P##_DECL_OUT)                                                                               \
            const uint16_t *v = vc + d;                                                                           \
            for (int s = 0; s < n_keys; s++, v += stride) {                                                       \
                if (d == 0) att_prefetch_row((uintptr_t)v + ATT_PF_KEYS * stride * 2, hd);                        \
                P##_LOAD_V(v)                                                                                     \
                ATT_H##NH(P##_AXPY_STEP)                                                                          \
            }                                                                                                     \
            ATT_H##NH(P##_OUT_STORE)                                                                              \
        }                                                                                                         \
    }
/* score of head j for key s: its lane sum SUM, scaled, stored, and the running maximum updated */
#define ATT_STORE_SCORE(j, SUM)                                                                                   \
    {                                                                                                             \
        float r = (SUM) * scale;                                                                                  \
        sc[(size_t)(j) * n_keys + s] = r;                                                                         \
        if (r > mx[j]) mx[j] = r;                                                                                 \
    }

/* ---- x86 AVX2 + F16C ------------------------------------------------------------------------------------- */
#ifdef MMOE_ATT_X86
#define AVX_FN __attribute__((target("avx2,f16c")))

AVX_FN static inline float hsum256(__m256 v) { /* ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* l0+l4 .. l3+l7 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          /* (0+2), (1+3) */
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

AVX_FN static float dot_f32_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    float r = hsum256(acc);
    for (; i < n; i++) r = r + a[i] * b[i];
    return r;
}

AVX_FN static inline __m256 ld_h8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p)); }

AVX_FN static float dot_f16_avx2(const float *q, const uint16_t *k, int n) {
    __m256 acc = _mm256_setzero_ps();
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(q + i), ld_h8(k + i)));
    float r = hsum256(acc);
    for (; i < n; i++) r = r + q[i] * h2f(k[i]);
    return r;
}

AVX_FN static void axpy_f16_avx2(float *o, float p, const uint16_t *v, int n) {
    __m256 pv = _mm256_set1_ps(p);
    int n8 = n & ~7, d;
    for (d = 0; d < n8; d += 8)
        _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_mul_ps(pv, ld_h8(v + d))));
    for (; d < n; d++) o[d] = o[d] + p * h2f(v[d]);
}

/* Scores of NH query heads (GQA: they share one KV head) against one key row: the key is converted from fp16
 * once for all NH heads; each head's lanes and reduction are exactly dot_f16_avx2's. */
#define AVX_DOTS(NH)                                                                                              \
    AVX_FN static void dots##NH##_avx2(const float *q, int hd, const uint16_t *k, float *r) {                    \
        __m256 acc[NH];                                                                                           \
        for (int j = 0; j < NH; j++) acc[j] = _mm256_setzero_ps();                                                \
        int n8 = hd & ~7, i;                                                                                      \
        for (i = 0; i < n8; i += 8) {                                                                             \
            __m256 kv = ld_h8(k + i);                                                                             \
            for (int j = 0; j < NH; j++)                                                                          \
                acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_loadu_ps(q + (size_t)j * hd + i), kv));     \
        }                                                                                                         \
        for (int j = 0; j < NH; j++) {                                                                            \
            float t = hsum256(acc[j]);                                                                            \
            for (int d = n8; d < hd; d++) t = t + q[(size_t)j * hd + d] * h2f(k[d]);                             \
            r[j] = t;                                                                                             \
        }                                                                                                         \
    }                                                                                                             \
    AVX_FN static void axpys##NH##_avx2(float *o, int hd, const float *p, const uint16_t *v) {                   \
        int n8 = hd & ~7, d;                                                                                      \
        for (d = 0; d < n8; d += 8) {                                                                             \
            __m256 vv = ld_h8(v + d);                                                                             \
            for (int j = 0; j < NH; j++) {                                                                        \
                float *oj = o + (size_t)j * hd + d;                                                               \
                _mm256_storeu_ps(oj, _mm256_add_ps(_mm256_loadu_ps(oj), _mm256_mul_ps(_mm256_set1_ps(p[j]), vv))); \
            }                                                                                                     \
        }                                                                                                         \
        for (; d < hd; d++)                                                                                       \
            for (int j = 0; j < NH; j++) o[(size_t)j * hd + d] = o[(size_t)j * hd + d] + p[j] * h2f(v[d]);      \
    }
AVX_DOTS(2)
AVX_DOTS(4)

/* ATT_GROUP's pieces for AVX2 (blocks of 16 dims = 2 ymm per head) */
#define AVX_DECL_ACC(j) __m256 a##j = _mm256_setzero_ps();
#define AVX_LOAD_K(p) __m256 kv = ld_h8(p);
#define AVX_DOT_STEP(j) a##j = _mm256_add_ps(a##j, _mm256_mul_ps(_mm256_loadu_ps(q + (size_t)(j) * hd + i), kv));
#define AVX_DOT_STORE(j) ATT_STORE_SCORE(j, hsum256(a##j))
#define AVX_DECL_OUT(j) __m256 o##j##a = _mm256_setzero_ps(), o##j##b = _mm256_setzero_ps();
#define AVX_LOAD_V(p) __m256 v0 = ld_h8(p), v1 = ld_h8((p) + 8);
#define AVX_AXPY_STEP(j)                                                                                          \
    {                                                                                                             \
        __m256 p = _mm256_broadcast_ss(sc + (size_t)(j) * n_keys + s);                                            \
        o##j##a = _mm256_add_ps(o##j##a, _mm256_mul_ps(p, v0));                                                   \
        o##j##b = _mm256_add_ps(o##j##b, _mm256_mul_ps(p, v1));                                                   \
    }
#define AVX_OUT_STORE(j)                                                                                          \
    _mm256_storeu_ps(o + (size_t)(j) * hd + d, o##j##a);                                                          \
    _mm256_storeu_ps(o + (size_t)(j) * hd + d + 8, o##j##b);
ATT_GROUP(att_group2_avx2, 2, AVX_FN, AVX)
ATT_GROUP(att_group4_avx2, 4, AVX_FN, AVX)

/* att_softmax_row with the division by the sum 8 keys at a time (IEEE division: the same quotients); the scalar
 * divisions were a fifth of a prefill tile's time. */
AVX_FN static inline void att_softmax_row_avx2(float *scr, int n_keys, float mx) {
    float sum = att_exp_sum(scr, n_keys, mx);
    __m256 sv = _mm256_set1_ps(sum);
    int s = 0;
    for (; s + 8 <= n_keys; s += 8) _mm256_storeu_ps(scr + s, _mm256_div_ps(_mm256_loadu_ps(scr + s), sv));
    for (; s < n_keys; s++) scr[s] = scr[s] / sum;
}

/* ATT_TILE's pieces for AVX2 (8 dims = 1 ymm per row) */
#define AVXT_SOFTMAX att_softmax_row_avx2
#define AVXT_DECL_ACC(r) __m256 a##r = _mm256_setzero_ps();
#define AVXT_DOT_STEP(r) a##r = _mm256_add_ps(a##r, _mm256_mul_ps(_mm256_loadu_ps(qr[r] + i), kv));
#define AVXT_DOT_STORE(r) ATT_TILE_SCORE(r, hsum256(a##r))
#define AVXT_DECL_OUT(r) __m256 o##r = _mm256_setzero_ps();
#define AVXT_LOAD_V(p) __m256 v0 = ld_h8(p);
#define AVXT_AXPY(r) o##r = _mm256_add_ps(o##r, _mm256_mul_ps(_mm256_broadcast_ss(sc + (size_t)(r) * ld + s), v0));
#define AVXT_AXPY_IF(r) ATT_TILE_AXPY_IF(AVX, r)
#define AVXT_OUT_STORE(r) _mm256_storeu_ps(orow[r] + d, o##r);
ATT_TILES(att_tile_avx2_, AVX_FN, AVX)

static int have_avx2_f16c(void) { /* cpuid + xgetbv (clang's __builtin_cpu_supports has no "f16c") */
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!((c >> 29) & 1u) || !((c >> 28) & 1u) || !((c >> 27) & 1u)) return 0; /* F16C, AVX, OSXSAVE */
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 6u) != 6u) return 0; /* the OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1u; /* AVX2 */
}
#endif

/* ---- ARM NEON (baseline ARMv8.0: fp16 <-> fp32 conversion is part of it) ---------------------------------- */
#ifdef MMOE_ATT_NEON
static inline float hsum_neon(float32x4_t lo, float32x4_t hi) { /* same tree as hsum256 */
    float32x4_t s = vaddq_f32(lo, hi);
    float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}

static float dot_f32_neon(const float *a, const float *b, int n) {
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8) {
        lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(a + i), vld1q_f32(b + i)));
        hi = vaddq_f32(hi, vmulq_f32(vld1q_f32(a + i + 4), vld1q_f32(b + i + 4)));
    }
    float r = hsum_neon(lo, hi);
    for (; i < n; i++) r = r + a[i] * b[i];
    return r;
}

static inline float16x8_t ld_h8n(const uint16_t *p) { return vreinterpretq_f16_u16(vld1q_u16(p)); }

static float dot_f16_neon(const float *q, const uint16_t *k, int n) {
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    int n8 = n & ~7, i;
    for (i = 0; i < n8; i += 8) {
        float16x8_t h = ld_h8n(k + i);
        lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(q + i), vcvt_f32_f16(vget_low_f16(h))));
        hi = vaddq_f32(hi, vmulq_f32(vld1q_f32(q + i + 4), vcvt_high_f32_f16(h)));
    }
    float r = hsum_neon(lo, hi);
    for (; i < n; i++) r = r + q[i] * h2f(k[i]);
    return r;
}

static void axpy_f16_neon(float *o, float p, const uint16_t *v, int n) {
    float32x4_t pv = vdupq_n_f32(p);
    int n8 = n & ~7, d;
    for (d = 0; d < n8; d += 8) {
        float16x8_t h = ld_h8n(v + d);
        vst1q_f32(o + d, vaddq_f32(vld1q_f32(o + d), vmulq_f32(pv, vcvt_f32_f16(vget_low_f16(h)))));
        vst1q_f32(o + d + 4, vaddq_f32(vld1q_f32(o + d + 4), vmulq_f32(pv, vcvt_high_f32_f16(h))));
    }
    for (; d < n; d++) o[d] = o[d] + p * h2f(v[d]);
}
#endif

#ifdef MMOE_ATT_NEON
#define NEON_DOTS(NH)                                                                                             \
    static void dots##NH##_neon(const float *q, int hd, const uint16_t *k, float *r) {                           \
        float32x4_t lo[NH], hi[NH];                                                                               \
        for (int j = 0; j < NH; j++) lo[j] = hi[j] = vdupq_n_f32(0.0f);                                           \
        int n8 = hd & ~7, i;                                                                                      \
        for (i = 0; i < n8; i += 8) {                                                                             \
            float16x8_t h = ld_h8n(k + i);                                                                        \
            float32x4_t kl = vcvt_f32_f16(vget_low_f16(h)), kh = vcvt_high_f32_f16(h);                           \
            for (int j = 0; j < NH; j++) {                                                                        \
                lo[j] = vaddq_f32(lo[j], vmulq_f32(vld1q_f32(q + (size_t)j * hd + i), kl));                      \
                hi[j] = vaddq_f32(hi[j], vmulq_f32(vld1q_f32(q + (size_t)j * hd + i + 4), kh));                  \
            }                                                                                                     \
        }                                                                                                         \
        for (int j = 0; j < NH; j++) {                                                                            \
            float t = hsum_neon(lo[j], hi[j]);                                                                    \
            for (int d = n8; d < hd; d++) t = t + q[(size_t)j * hd + d] * h2f(k[d]);                             \
            r[j] = t;                                                                                             \
        }                                                                                                         \
    }                                                                                                             \
    static void axpys##NH##_neon(float *o, int hd, const float *p, const uint16_t *v) {                          \
        int n8 = hd & ~7, d;                                                                                      \
        for (d = 0; d < n8; d += 8) {                                                                             \
            float16x8_t h = ld_h8n(v + d);                                                                        \
            float32x4_t vl = vcvt_f32_f16(vget_low_f16(h)), vh = vcvt_high_f32_f16(h);                           \
            for (int j = 0; j < NH; j++) {                                                                        \
                float *oj = o + (size_t)j * hd + d;                                                               \
                float32x4_t pv = vdupq_n_f32(p[j]);                                                               \
                vst1q_f32(oj, vaddq_f32(vld1q_f32(oj), vmulq_f32(pv, vl)));                                       \
                vst1q_f32(oj + 4, vaddq_f32(vld1q_f32(oj + 4), vmulq_f32(pv, vh)));                               \
            }                                                                                                     \
        }                                                                                                         \
        for (; d < hd; d++)                                                                                       \
            for (int j = 0; j < NH; j++) o[(size_t)j * hd + d] = o[(size_t)j * hd + d] + p[j] * h2f(v[d]);      \
    }
NEON_DOTS(2)
NEON_DOTS(4)

/* ATT_GROUP's pieces for NEON (blocks of 16 dims = 4 q registers per head) */
#define NATT_DECL_ACC(j) float32x4_t a##j##l = vdupq_n_f32(0.0f), a##j##h = vdupq_n_f32(0.0f);
#define NATT_LOAD_K(p)                                                                                            \
    float16x8_t h = ld_h8n(p);                                                                                    \
    float32x4_t kl = vcvt_f32_f16(vget_low_f16(h)), kh = vcvt_high_f32_f16(h);
#define NATT_DOT_STEP(j)                                                                                          \
    a##j##l = vaddq_f32(a##j##l, vmulq_f32(vld1q_f32(q + (size_t)(j) * hd + i), kl));                             \
    a##j##h = vaddq_f32(a##j##h, vmulq_f32(vld1q_f32(q + (size_t)(j) * hd + i + 4), kh));
#define NATT_DOT_STORE(j) ATT_STORE_SCORE(j, hsum_neon(a##j##l, a##j##h))
#define NATT_LOAD_V(p)                                                                                            \
    float16x8_t h0 = ld_h8n(p), h1 = ld_h8n((p) + 8);                                                             \
    float32x4_t v0 = vcvt_f32_f16(vget_low_f16(h0)), v1 = vcvt_high_f32_f16(h0);                                 \
    float32x4_t v2 = vcvt_f32_f16(vget_low_f16(h1)), v3 = vcvt_high_f32_f16(h1);
#define NATT_DECL_OUT(j)                                                                                          \
    float32x4_t o##j##0 = vdupq_n_f32(0.0f), o##j##1 = o##j##0, o##j##2 = o##j##0, o##j##3 = o##j##0;
#define NATT_AXPY_STEP(j)                                                                                         \
    {                                                                                                             \
        float32x4_t p = vdupq_n_f32(sc[(size_t)(j) * n_keys + s]);                                                \
        o##j##0 = vaddq_f32(o##j##0, vmulq_f32(p, v0));                                                           \
        o##j##1 = vaddq_f32(o##j##1, vmulq_f32(p, v1));                                                           \
        o##j##2 = vaddq_f32(o##j##2, vmulq_f32(p, v2));                                                           \
        o##j##3 = vaddq_f32(o##j##3, vmulq_f32(p, v3));                                                           \
    }
#define NATT_OUT_STORE(j)                                                                                         \
    vst1q_f32(o + (size_t)(j) * hd + d, o##j##0);                                                                 \
    vst1q_f32(o + (size_t)(j) * hd + d + 4, o##j##1);                                                             \
    vst1q_f32(o + (size_t)(j) * hd + d + 8, o##j##2);                                                             \
    vst1q_f32(o + (size_t)(j) * hd + d + 12, o##j##3);
ATT_GROUP(att_group2_neon, 2, , NATT)
ATT_GROUP(att_group4_neon, 4, , NATT)

/* att_softmax_row with the division by the sum 4 keys at a time (IEEE division: the same quotients) */
static inline void att_softmax_row_neon(float *scr, int n_keys, float mx) {
    float sum = att_exp_sum(scr, n_keys, mx);
    float32x4_t sv = vdupq_n_f32(sum);
    int s = 0;
    for (; s + 4 <= n_keys; s += 4) vst1q_f32(scr + s, vdivq_f32(vld1q_f32(scr + s), sv));
    for (; s < n_keys; s++) scr[s] = scr[s] / sum;
}

/* ATT_TILE's pieces for NEON (8 dims = 2 q registers per row) */
#define NATTT_SOFTMAX att_softmax_row_neon
#define NATTT_DECL_ACC(r) float32x4_t a##r##l = vdupq_n_f32(0.0f), a##r##h = vdupq_n_f32(0.0f);
#define NATTT_DOT_STEP(r)                                                                                         \
    a##r##l = vaddq_f32(a##r##l, vmulq_f32(vld1q_f32(qr[r] + i), kl));                                           \
    a##r##h = vaddq_f32(a##r##h, vmulq_f32(vld1q_f32(qr[r] + i + 4), kh));
#define NATTT_DOT_STORE(r) ATT_TILE_SCORE(r, hsum_neon(a##r##l, a##r##h))
#define NATTT_DECL_OUT(r) float32x4_t o##r##0 = vdupq_n_f32(0.0f), o##r##1 = o##r##0;
#define NATTT_LOAD_V(p)                                                                                           \
    float16x8_t h0 = ld_h8n(p);                                                                                   \
    float32x4_t v0 = vcvt_f32_f16(vget_low_f16(h0)), v1 = vcvt_high_f32_f16(h0);
#define NATTT_AXPY(r)                                                                                             \
    {                                                                                                             \
        float32x4_t p = vdupq_n_f32(sc[(size_t)(r) * ld + s]);                                                    \
        o##r##0 = vaddq_f32(o##r##0, vmulq_f32(p, v0));                                                           \
        o##r##1 = vaddq_f32(o##r##1, vmulq_f32(p, v1));                                                           \
    }
#define NATTT_AXPY_IF(r) ATT_TILE_AXPY_IF(NATT, r)
#define NATTT_OUT_STORE(r)                                                                                        \
    vst1q_f32(orow[r] + d, o##r##0);                                                                              \
    vst1q_f32(orow[r] + d + 4, o##r##1);
ATT_TILES(att_tile_neon_, , NATT)
#endif

/* ---- dispatch ------------------------------------------------------------------------------------------- */
int mmoe_att_best_impl(void) {
#ifdef MMOE_ATT_X86
    return have_avx2_f16c() ? MMOE_ATT_SIMD : MMOE_ATT_SCALAR;
#elif defined(MMOE_ATT_NEON)
    return MMOE_ATT_SIMD;
#else
    return MMOE_ATT_SCALAR;
#endif
}

float mmoe_dot_f32(const float *a, const float *b, int n, int impl) {
#ifdef MMOE_ATT_X86
    if (impl == MMOE_ATT_SIMD) return dot_f32_avx2(a, b, n);
#elif defined(MMOE_ATT_NEON)
    if (impl == MMOE_ATT_SIMD) return dot_f32_neon(a, b, n);
#endif
    return dot_f32_scalar(a, b, n);
}

float mmoe_dot_f16(const float *a, const uint16_t *b, int n, int impl) {
#ifdef MMOE_ATT_X86
    if (impl == MMOE_ATT_SIMD) return dot_f16_avx2(a, b, n);
#elif defined(MMOE_ATT_NEON)
    if (impl == MMOE_ATT_SIMD) return dot_f16_neon(a, b, n);
#endif
    return dot_f16_scalar(a, b, n);
}

void mmoe_att_head(const float *q, const uint16_t *kc, const uint16_t *vc, size_t stride, int n_keys, int hd,
                   float scale, float *sc, float *o, int impl) {
    float (*dot)(const float *, const uint16_t *, int) = dot_f16_scalar;
    void (*axpy)(float *, float, const uint16_t *, int) = axpy_f16_scalar;
#ifdef MMOE_ATT_X86
    if (impl == MMOE_ATT_SIMD) {
        dot = dot_f16_avx2;
        axpy = axpy_f16_avx2;
    }
#elif defined(MMOE_ATT_NEON)
    if (impl == MMOE_ATT_SIMD) {
        dot = dot_f16_neon;
        axpy = axpy_f16_neon;
    }
#else
    (void)impl;
#endif
    float mx = -INFINITY;
    for (int s = 0; s < n_keys; s++) {
        sc[s] = dot(q, kc + (size_t)s * stride, hd) * scale;
        if (sc[s] > mx) mx = sc[s];
    }
    float sum = 0.0f;
    for (int s = 0; s < n_keys; s++) {
        sc[s] = expf(sc[s] - mx);
        sum += sc[s];
    }
    for (int d = 0; d < hd; d++) o[d] = 0.0f;
    for (int s = 0; s < n_keys; s++) axpy(o, sc[s] / sum, vc + (size_t)s * stride, hd);
}

/* ng query heads (consecutive, hd apart in q and o) sharing one KV head: the same values as mmoe_att_head on each
 * head, with each fp16 key/value row converted once per 4 (or 2) heads instead of once per head. */
void mmoe_att_group(const float *q, int ng, const uint16_t *kc, const uint16_t *vc, size_t stride, int n_keys,
                    int hd, float scale, float *sc, float *o, int impl) {
    void (*dots)(const float *, int, const uint16_t *, float *) = NULL;
    void (*axpys)(float *, int, const float *, const uint16_t *) = NULL;
#ifdef MMOE_ATT_X86
    if (impl == MMOE_ATT_SIMD && hd % 16 == 0 && (ng == 4 || ng == 2)) {
        if (ng == 4) att_group4_avx2(q, kc, vc, stride, n_keys, hd, scale, sc, o);
        else att_group2_avx2(q, kc, vc, stride, n_keys, hd, scale, sc, o);
        return;
    }
    if (impl == MMOE_ATT_SIMD && ng == 4) dots = dots4_avx2, axpys = axpys4_avx2;
    if (impl == MMOE_ATT_SIMD && ng == 2) dots = dots2_avx2, axpys = axpys2_avx2;
#elif defined(MMOE_ATT_NEON)
    if (impl == MMOE_ATT_SIMD && hd % 16 == 0 && (ng == 4 || ng == 2)) {
        if (ng == 4) att_group4_neon(q, kc, vc, stride, n_keys, hd, scale, sc, o);
        else att_group2_neon(q, kc, vc, stride, n_keys, hd, scale, sc, o);
        return;
    }
    if (impl == MMOE_ATT_SIMD && ng == 4) dots = dots4_neon, axpys = axpys4_neon;
    if (impl == MMOE_ATT_SIMD && ng == 2) dots = dots2_neon, axpys = axpys2_neon;
#endif
    if (!dots) {
        for (int j = 0; j < ng; j++)
            mmoe_att_head(q + (size_t)j * hd, kc, vc, stride, n_keys, hd, scale, sc, o + (size_t)j * hd, impl);
        return;
    }
    float r[4], mx[4], sum[4], p[4];
    for (int j = 0; j < ng; j++) mx[j] = -INFINITY;
    for (int s = 0; s < n_keys; s++) {
        dots(q, hd, kc + (size_t)s * stride, r);
        for (int j = 0; j < ng; j++) {
            float v = r[j] * scale;
            sc[(size_t)j * n_keys + s] = v;
            if (v > mx[j]) mx[j] = v;
        }
    }
    for (int j = 0; j < ng; j++) {
        float *scj = sc + (size_t)j * n_keys, acc = 0.0f;
        for (int s = 0; s < n_keys; s++) {
            scj[s] = expf(scj[s] - mx[j]);
            acc += scj[s];
        }
        sum[j] = acc;
    }
    for (size_t i = 0; i < (size_t)ng * hd; i++) o[i] = 0.0f;
    for (int s = 0; s < n_keys; s++) {
        for (int j = 0; j < ng; j++) p[j] = sc[(size_t)j * n_keys + s] / sum[j];
        axpys(o, hd, p, vc + (size_t)s * stride);
    }
}

/* Prefill: nq consecutive query tokens (q_stride apart in q, o_stride in o), each with ng heads (hd apart) of one
 * KV head, query b seeing keys 0 .. n_keys0 + b - 1: for every b exactly mmoe_att_group(q + b * q_stride, ng, ...,
 * n_keys0 + b, ...), bit for bit. Its (token, head) rows go through tiles of MMOE_ATT_TILE, which share each key and
 * value row's conversion; sc holds MMOE_ATT_TILE * (n_keys0 + nq - 1) floats. */
void mmoe_att_block(const float *q, size_t q_stride, int nq, int ng, const uint16_t *kc, const uint16_t *vc,
                    size_t stride, int n_keys0, int hd, float scale, float *sc, float *o, size_t o_stride, int impl) {
    const att_tile_fn *tiles = NULL;
#ifdef MMOE_ATT_X86
    if (impl == MMOE_ATT_SIMD && hd % 8 == 0) tiles = att_tile_avx2_s;
#elif defined(MMOE_ATT_NEON)
    if (impl == MMOE_ATT_SIMD && hd % 8 == 0) tiles = att_tile_neon_s;
#else
    (void)impl;
#endif
    const float *qr[MMOE_ATT_TILE];
    float *orow[MMOE_ATT_TILE];
    int nk[MMOE_ATT_TILE], rows = nq * ng;
    for (int r0 = 0; r0 < rows; r0 += MMOE_ATT_TILE) {
        int rt = rows - r0 < MMOE_ATT_TILE ? rows - r0 : MMOE_ATT_TILE;
        for (int r = 0; r < rt; r++) {
            int b = (r0 + r) / ng, j = (r0 + r) % ng;
            qr[r] = q + (size_t)b * q_stride + (size_t)j * hd;
            orow[r] = o + (size_t)b * o_stride + (size_t)j * hd;
            nk[r] = n_keys0 + b;
        }
        if (tiles) tiles[rt](qr, orow, nk, kc, vc, stride, hd, scale, sc);
        else att_tile_scalar(qr, orow, nk, rt, kc, vc, stride, hd, scale, sc);
    }
}
