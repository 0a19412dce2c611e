/* Kernel tests: fp16 conversions, int8 activation quantization, and for every kernel set usable on this CPU,
 * gemv and gemm outputs compared with memcmp against the scalar set, which is itself compared with a plain
 * reference that unpacks each weight element straight from the format in kernels.h.
 *
 * usage: test_kernels [--expect-sets a,b,c] [--expect-best NAME] [--quick]
 *   --expect-sets: the exact list mmoe_kernels_available() must return (checks runtime detection)
 *   --expect-best: the set mmoe_kernels_best() must pick (MMOE_KERNELS is honoured, as in the engine)
 * exit 0 on success; the first failure is printed and the exit code is 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels.h"

static int g_fail;
static long g_cases;

#define CHECK(cond, ...)                                                                                           \
    do {                                                                                                           \
        if (!(cond)) {                                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                                   \
            fprintf(stderr, __VA_ARGS__);                                                                          \
            fprintf(stderr, "\n");                                                                                 \
            g_fail = 1;                                                                                            \
            return;                                                                                                \
        }                                                                                                          \
    } while (0)

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { /* xorshift64*: deterministic across builds */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545f4914f6cdd1dull;
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------- reference pieces written from the definitions, independent of fp16.c / kernels_scalar.c ---------- */

static float ref_fp16_to_f32(mmoe_fp16 h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(1024 + m), e - 25);
    return s ? -v : v;
}

/* weight element k of row r, straight from the nibble layout */
static int ref_weight(const mmoe_q4_matrix *W, int r, int k) {
    int g = k / 32, j = k % 32;
    uint8_t byte = W->qs[(size_t)r * (size_t)(W->cols / 2) + (size_t)g * 16 + (size_t)(j % 16)];
    int nib = j < 16 ? (byte & 15) : (byte >> 4);
    return nib - 8;
}

static float ref_dot(const mmoe_q4_matrix *W, int r, const int8_t *xq, float xs) {
    int G = W->cols / 32;
    float acc = 0.0f;
    for (int g = 0; g < G; g++) {
        long long isum = 0;
        for (int j = 0; j < 32; j++) isum += (long long)xq[32 * g + j] * ref_weight(W, r, 32 * g + j);
        float p = (float)isum * ref_fp16_to_f32(W->d[(size_t)r * (size_t)G + (size_t)g]);
        acc = acc + p;
    }
    return acc * xs;
}

/* ---------- fp16 ---------- */

static void test_fp16(void) {
    /* every fp16 -> f32 against the ldexp definition, and back unchanged (NaNs stay NaN) */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = mmoe_fp16_to_f32((mmoe_fp16)h), r = ref_fp16_to_f32((mmoe_fp16)h);
        if (isnan(r)) {
            CHECK(isnan(f), "fp16 %04x: expected NaN", h);
            CHECK(((mmoe_f32_to_fp16(f) >> 10) & 31) == 31 && (mmoe_f32_to_fp16(f) & 1023),
                  "fp16 NaN %04x did not round-trip to a NaN", h);
            continue;
        }
        CHECK(fbits(f) == fbits(r), "fp16 %04x -> %08x, want %08x", h, fbits(f), fbits(r));
        CHECK(mmoe_f32_to_fp16(f) == h, "fp16 %04x round trip gave %04x", h, mmoe_f32_to_fp16(f));
        g_cases++;
    }
    /* f32 -> fp16 round-half-even, tested at and around every midpoint between adjacent fp16 values:
     * below the midpoint -> lower, above -> upper, exactly on it -> the even one */
    for (uint32_t h = 0; h < 0x7c00; h++) {
        float lo = ref_fp16_to_f32((mmoe_fp16)h);
        float hi = h + 1 == 0x7c00 ? 65536.0f : ref_fp16_to_f32((mmoe_fp16)(h + 1));
        float mid = (lo + hi) * 0.5f; /* exact: fp16 spacing is far above fp32 resolution */
        uint32_t up = h + 1;
        uint32_t even = (h & 1) ? up : h;
        for (int sgn = 0; sgn < 2; sgn++) {
            uint32_t sb = sgn ? 0x8000u : 0;
            float s = sgn ? -1.0f : 1.0f;
            CHECK(mmoe_f32_to_fp16(s * mid) == (even | sb), "midpoint above %04x -> %04x", h, mmoe_f32_to_fp16(s * mid));
            float below = bitsf(fbits(mid) - 1), above = bitsf(fbits(mid) + 1);
            if (mid != 0.0f) {
                CHECK(mmoe_f32_to_fp16(s * below) == (h | sb), "just below midpoint of %04x", h);
                CHECK(mmoe_f32_to_fp16(s * above) == (up | sb), "just above midpoint of %04x", h);
            }
            g_cases += 3;
        }
    }
    CHECK(mmoe_f32_to_fp16(INFINITY) == 0x7c00 && mmoe_f32_to_fp16(-INFINITY) == 0xfc00, "inf");
    CHECK(mmoe_f32_to_fp16(1e30f) == 0x7c00 && mmoe_f32_to_fp16(65519.996f) == 0x7bff, "overflow boundary");
    CHECK(mmoe_f32_to_fp16(-0.0f) == 0x8000 && mmoe_f32_to_fp16(1e-30f) == 0, "signed zero / underflow");
    CHECK(mmoe_f32_to_fp16(bitsf(1)) == 0 && mmoe_f32_to_fp16(bitsf(0x80000001u)) == 0x8000, "f32 subnormals");
    {
        mmoe_fp16 n = mmoe_f32_to_fp16(NAN);
        CHECK(((n >> 10) & 31) == 31 && (n & 1023), "NaN -> %04x", n);
    }
#if defined(__FLT16_MAX__) && !defined(__clang__)
    /* the compiler's own conversion as a third opinion on random bit patterns */
    for (int i = 0; i < 200000; i++) {
        float f = bitsf((uint32_t)rnd());
        if (isnan(f)) continue;
        _Float16 c = (_Float16)f;
        uint16_t cb;
        memcpy(&cb, &c, 2);
        CHECK(mmoe_f32_to_fp16(f) == cb, "f32 %08x -> %04x, compiler says %04x", fbits(f), mmoe_f32_to_fp16(f), cb);
        g_cases++;
    }
#endif
}

/* ---------- activation quantization ---------- */

static void test_quantize(void) {
    int8_t q[96];
    float x[96];
    /* ties: amax 127 gives scale exactly 1, so x/s = x and k + 0.5 must round to the even neighbour */
    const float tie_x[8] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 126.5f};
    const int8_t tie_q[8] = {127, 0, 2, 2, 0, -2, -2, 126};
    float s = mmoe_quantize_row_q8(tie_x, q, 8);
    CHECK(s == 1.0f, "scale %g, want 1", (double)s);
    for (int i = 0; i < 8; i++) CHECK(q[i] == tie_q[i], "tie %d: q %d, want %d", i, q[i], tie_q[i]);
    /* zero row -> the smallest normal scale, all zero */
    memset(x, 0, sizeof x);
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 0x1p-126f, "zero row scale %g", (double)s);
    for (int i = 0; i < 96; i++) CHECK(q[i] == 0, "zero row q[%d]=%d", i, q[i]);
    /* tiny row (amax / 127 subnormal): scale FLT_MIN, so x = 3 * 2^-128 (0.75 * FLT_MIN) -> 1, 2^-128 -> 0 */
    for (int i = 0; i < 96; i++) x[i] = ldexpf((float)(i % 4), -128) * (i & 4 ? -1.0f : 1.0f);
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 0x1p-126f, "tiny row scale %g", (double)s);
    for (int i = 0; i < 96; i++) {
        int want = i % 4 == 3; /* x / s = 0, 0.25, 0.5 (a tie: to even 0), 0.75 */
        if (i & 4) want = -want;
        CHECK(q[i] == want, "tiny row q[%d]=%d want %d", i, q[i], want);
    }
    /* huge row: amax = FLT_MAX is finite, scale FLT_MAX / 127; an inf makes it FLT_MAX (here finite x -> +-1) */
    for (int i = 0; i < 96; i++) x[i] = (i & 1 ? -1.0f : 1.0f) * 0x1.fffffep+127f;
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 0x1.fffffep+127f / 127.0f, "huge row scale %g", (double)s);
    for (int i = 0; i < 96; i++) CHECK(q[i] == (i & 1 ? -127 : 127), "huge row q[%d]=%d", i, q[i]);
    x[5] = -INFINITY;
    x[6] = NAN;
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 0x1.fffffep+127f, "inf row scale %g", (double)s);
    for (int i = 0; i < 96; i++)
        CHECK(q[i] == (i == 5 ? -127 : i == 6 ? 0 : i & 1 ? -1 : 1), "inf row q[%d]=%d", i, q[i]);
    /* NaN elements are skipped by amax and get code 0; an all-NaN row is a zero row */
    for (int i = 0; i < 96; i++) x[i] = i % 3 ? NAN : (float)(i - 48);
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 48.0f / 127.0f, "NaN row scale %g", (double)s);
    for (int i = 0; i < 96; i++) CHECK(i % 3 == 0 || q[i] == 0, "NaN element q[%d]=%d", i, q[i]);
    for (int i = 0; i < 96; i++) x[i] = -NAN;
    s = mmoe_quantize_row_q8(x, q, 96);
    CHECK(s == 0x1p-126f, "all-NaN row scale %g", (double)s);
    for (int i = 0; i < 96; i++) CHECK(q[i] == 0, "all-NaN row q[%d]=%d", i, q[i]);
    /* random rows: scale = amax/127, the amax element maps to +-127, every q = clamp(rint(x/s)) */
    for (int t = 0; t < 200; t++) {
        int K = 32 * rnd_int(1, 3);
        float amax = 0.0f;
        for (int i = 0; i < K; i++) {
            x[i] = ldexpf((float)((int)(rnd() % 2000001) - 1000000), rnd_int(-30, 0));
            amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        }
        s = mmoe_quantize_row_q8(x, q, K);
        float want_s = amax / 127.0f;
        if (want_s < 0x1p-126f) want_s = 0x1p-126f;
        CHECK(fbits(s) == fbits(want_s), "scale");
        for (int i = 0; i < K; i++) {
            float v = x[i] / s, r = floorf(v), diff = v - r;
            int w = (int)r + (diff > 0.5f || (diff == 0.5f && fmodf(r, 2.0f) != 0.0f));
            w = w < -127 ? -127 : w > 127 ? 127 : w;
            CHECK(q[i] == w, "q[%d]=%d want %d (x=%g s=%g)", i, q[i], w, (double)x[i], (double)s);
            if (fabsf(x[i]) == amax && amax > 0) CHECK(q[i] == (x[i] > 0 ? 127 : -127), "amax element");
        }
        g_cases++;
    }
}

/* ---------- matrices ---------- */

typedef struct {
    mmoe_q4_matrix W;
    uint8_t *qs;
    mmoe_fp16 *d;
} owned_matrix;

enum { W_RANDOM, W_MIN, W_MAX, W_EXTREME_MIX };

static owned_matrix make_matrix(int rows, int K, int mode) {
    owned_matrix m;
    size_t nq = (size_t)rows * (size_t)K / 2, nd = (size_t)rows * (size_t)K / 32;
    m.qs = malloc(nq ? nq : 1);
    m.d = malloc((nd ? nd : 1) * sizeof(mmoe_fp16));
    for (size_t i = 0; i < nq; i++) {
        switch (mode) {
        case W_MIN: m.qs[i] = 0x00; break;        /* every q = -8 */
        case W_MAX: m.qs[i] = 0xff; break;        /* every q = +7 */
        case W_EXTREME_MIX: m.qs[i] = (uint8_t)((rnd() & 1 ? 0x0f : 0) | (rnd() & 1 ? 0xf0 : 0)); break;
        default: m.qs[i] = (uint8_t)rnd(); break;
        }
    }
    for (size_t i = 0; i < nd; i++) {
        int kind = rnd_int(0, 19);
        float v;
        if (kind == 0) v = 0.0f;
        else if (kind == 1) v = ldexpf((float)rnd_int(1, 1023), -24); /* fp16 subnormal scale */
        else if (kind == 2) v = 65504.0f;                               /* largest fp16 */
        else v = ldexpf((float)rnd_int(1, 100000) / 100000.0f, rnd_int(-12, 0));
        if (rnd() & 1) v = -v;
        m.d[i] = mmoe_f32_to_fp16(v);
    }
    m.W.qs = m.qs;
    m.W.d = m.d;
    m.W.rows = rows;
    m.W.cols = K;
    return m;
}

static void fill_x(int8_t *x, int n, int mode) {
    for (int i = 0; i < n; i++) {
        switch (mode) {
        case 1: x[i] = -127; break;
        case 2: x[i] = 127; break;
        case 3: x[i] = rnd() & 1 ? 127 : -127; break;
        default: x[i] = (int8_t)rnd_int(-127, 127); break;
        }
    }
}

#define CANARY 0x7fc0dead /* a NaN bit pattern no kernel produces */

/* every set's quantizer gives the scalar's bytes and scale: random rows with ties, zeros, NaN, inf, tails */
static void test_set_quantize(const mmoe_kernel_set *k) {
    static float x[1056];
    static int8_t q0[1056], q1[1056];
    for (int t = 0; t < 400; t++) {
        int K = t < 300 ? 32 * rnd_int(1, 33) : rnd_int(1, 1056);
        int mode = t % 8;
        for (int i = 0; i < K; i++) {
            x[i] = ldexpf((float)((int)(rnd() % 2000001) - 1000000), rnd_int(-30, 0));
            if (mode == 1) x[i] = (float)((int)(rnd() % 255) - 127) + 0.5f; /* exact ties when amax gives s = 1 */
            if (mode == 2 && rnd() % 7 == 0) x[i] = 0.0f;
            /* subnormal and tiny normal rows: the scale clamps to FLT_MIN, codes from the IEEE division */
            if (mode == 5) x[i] = ldexpf((float)((int)(rnd() % 2001) - 1000), rnd_int(-152, -125));
            if (mode == 6) x[i] = ldexpf((float)((int)(rnd() % 2000001) - 1000000), rnd_int(100, 108)); /* huge */
            if (mode == 7 && rnd() % 3 == 0) x[i] = NAN;
        }
        if (mode == 1) x[rnd() % K] = 127.0f;
        if (mode == 3) x[rnd() % K] = NAN;
        if (mode == 4 || (mode == 6 && t % 3 == 0)) x[rnd() % K] = (rnd() & 1) ? INFINITY : -INFINITY;
        if (t == 7) memset(x, 0, sizeof(float) * (size_t)K);
        if (t == 15)
            for (int i = 0; i < K; i++) x[i] = NAN;
        float s0 = mmoe_quantize_row_q8(x, q0, K), s1 = k->quantize(x, q1, K);
        CHECK(fbits(s0) == fbits(s1), "%s quantize scale K=%d mode %d", k->name, K, mode);
        CHECK(memcmp(q0, q1, (size_t)K) == 0, "%s quantize bytes K=%d mode %d", k->name, K, mode);
        if (g_fail) return;
        g_cases++;
    }
}

static void test_scalar_vs_ref(const owned_matrix *m, const int8_t *xq, float xs) {
    const mmoe_q4_matrix *W = &m->W;
    float *y = malloc(sizeof(float) * (size_t)(W->rows ? W->rows : 1));
    mmoe_kernels_scalar()->gemv(W, xq, xs, y, 0, W->rows);
    for (int r = 0; r < W->rows; r++) {
        float want = ref_dot(W, r, xq, xs), got = y[r];
        if (fbits(got) != fbits(want)) {
            free(y);
            CHECK(0, "scalar vs reference: %dx%d row %d: %.9g vs %.9g", W->rows, W->cols, r, (double)got,
                  (double)want);
        }
    }
    free(y);
    g_cases++;
}

static void test_set_gemv(const mmoe_kernel_set *k, const owned_matrix *m, const int8_t *xq, float xs, int r0,
                          int r1) {
    const mmoe_q4_matrix *W = &m->W;
    int n = r1 - r0;
    uint32_t *a = malloc(sizeof(float) * (size_t)(n + 8)), *b = malloc(sizeof(float) * (size_t)(n + 8));
    for (int i = 0; i < n + 8; i++) a[i] = b[i] = CANARY;
    mmoe_kernels_scalar()->gemv(W, xq, xs, (float *)a, r0, r1);
    k->gemv(W, xq, xs, (float *)b, r0, r1);
    int bad = -1;
    for (int i = 0; i < n + 8 && bad < 0; i++)
        if (a[i] != b[i] || (i >= n && a[i] != CANARY)) bad = i;
    uint32_t ai = bad >= 0 ? a[bad] : 0, bi = bad >= 0 ? b[bad] : 0;
    free(a);
    free(b);
    CHECK(bad < 0, "%s gemv %dx%d rows [%d,%d): index %d scalar %08x %s %08x", k->name, W->rows, W->cols, r0, r1,
          bad, ai, k->name, bi);
    g_cases++;
}

static void test_set_gemm(const mmoe_kernel_set *k, const owned_matrix *m, const int8_t *X, const float *xs, int M,
                          int r0, int r1) {
    const mmoe_q4_matrix *W = &m->W;
    int n = r1 - r0, ldy = n + 3; /* a gap after every token's row range must stay untouched */
    size_t total = (size_t)M * (size_t)ldy + 4;
    uint32_t *Y = malloc(total * 4), *y1 = malloc(sizeof(float) * (size_t)(n + 1));
    for (size_t i = 0; i < total; i++) Y[i] = CANARY;
    k->gemm(W, X, xs, M, (float *)Y, ldy, r0, r1);
    const char *err = NULL;
    int bad_m = -1, bad_i = -1;
    for (int t = 0; t < M && !err; t++) {
        mmoe_kernels_scalar()->gemv(W, X + (size_t)t * (size_t)W->cols, xs[t], (float *)y1, r0, r1);
        for (int i = 0; i < ldy && !err; i++) {
            uint32_t got = Y[(size_t)t * (size_t)ldy + (size_t)i];
            if (i < n && got != y1[i]) err = "differs from scalar gemv of that token";
            if (i >= n && got != CANARY) err = "wrote outside its rows";
            if (err) bad_m = t, bad_i = i;
        }
    }
    for (size_t i = (size_t)M * (size_t)ldy; i < total && !err; i++)
        if (Y[i] != CANARY) err = "wrote past the last token";
    free(Y);
    free(y1);
    CHECK(!err, "%s gemm %dx%d M=%d rows [%d,%d): token %d index %d %s", k->name, W->rows, W->cols, M, r0, r1, bad_m,
          bad_i, err);
    g_cases++;
}

static void test_matrices(const mmoe_kernel_set *const *sets, int nsets, int quick) {
    static const int shapes[][2] = {{1, 32},  {3, 64},   {8, 32},   {9, 96},  {16, 160}, {17, 256},
                                    {33, 512}, {40, 288}, {64, 1024}, {12, 8480}, {7, 32 * 9},
                                    {36, 8192} /* > one 128 KB row block of the gemm driver */};
    int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
    for (int si = 0; si < nshapes; si++) {
        int rows = shapes[si][0], K = shapes[si][1];
        for (int wmode = 0; wmode < 4; wmode++) {
            if (quick && wmode && K > 1024) continue;
            owned_matrix m = make_matrix(rows, K, wmode);
            int Mmax = K > 1024 ? 5 : 9;
            int8_t *X = malloc((size_t)Mmax * (size_t)K);
            float xs[9];
            for (int t = 0; t < Mmax; t++) {
                /* token 0 extreme in the same direction as the weights, the others random or alternating */
                int xmode = t == 0 ? (wmode == W_MIN ? 1 : wmode == W_MAX ? 2 : 3) : (t == 1 ? 3 : 0);
                fill_x(X + (size_t)t * (size_t)K, K, xmode);
                xs[t] = t == 2 ? 1.0f : ldexpf((float)rnd_int(1, 1 << 20), -rnd_int(20, 30));
            }
            for (int t = 0; t < 2; t++) test_scalar_vs_ref(&m, X + (size_t)t * (size_t)K, xs[t]);
            if (g_fail) return;
            int ranges[5][2] = {{0, rows}, {1, rows}, {rows / 3, rows - 1}, {rows - 1, rows}, {rows / 2, rows / 2}};
            for (int s = 0; s < nsets; s++) {
                for (int ri = 0; ri < 5; ri++) {
                    int r0 = ranges[ri][0], r1 = ranges[ri][1];
                    if (r0 < 0 || r1 < r0 || r1 > rows) continue;
                    for (int t = 0; t < 2; t++) test_set_gemv(sets[s], &m, X + (size_t)t * (size_t)K, xs[t], r0, r1);
                    if (ri > 2) continue; /* gemm on the three larger ranges */
                    for (int M = 1; M <= Mmax; M++) {
                        if (quick && M > 5 && M != Mmax) continue;
                        test_set_gemm(sets[s], &m, X, xs, M, r0, r1);
                    }
                    if (g_fail) return;
                }
            }
            free(X);
            free(m.qs);
            free(m.d);
        }
    }
}

int main(int argc, char **argv) {
    const char *expect_sets = NULL, *expect_best = NULL;
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--expect-sets") && i + 1 < argc) expect_sets = argv[++i];
        else if (!strcmp(argv[i], "--expect-best") && i + 1 < argc) expect_best = argv[++i];
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "test_kernels: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    const char *const *names = mmoe_kernels_available();
    char got[256] = "";
    const mmoe_kernel_set *sets[16];
    int nsets = 0;
    for (int i = 0; names[i]; i++) {
        if (i) strncat(got, ",", sizeof got - strlen(got) - 1);
        strncat(got, names[i], sizeof got - strlen(got) - 1);
        sets[nsets] = mmoe_kernels_by_name(names[i]);
        if (!sets[nsets] || strcmp(sets[nsets]->name, names[i])) {
            fprintf(stderr, "FAIL: mmoe_kernels_by_name(%s) does not return that set\n", names[i]);
            return 1;
        }
        nsets++;
    }
    printf("available: %s\n", got);
    if (expect_sets && strcmp(expect_sets, got)) {
        fprintf(stderr, "FAIL: available sets '%s', expected '%s'\n", got, expect_sets);
        return 1;
    }
    if (strcmp(names[0], "scalar") || mmoe_kernels_scalar() != sets[0]) {
        fprintf(stderr, "FAIL: scalar must be the first available set\n");
        return 1;
    }
    const mmoe_kernel_set *best = mmoe_kernels_best();
    printf("best: %s\n", best ? best->name : "(none)");
    if (expect_best && (!best || strcmp(best->name, expect_best))) {
        fprintf(stderr, "FAIL: best set '%s', expected '%s'\n", best ? best->name : "(none)", expect_best);
        return 1;
    }
    if (mmoe_kernels_by_name("no-such-set") != NULL) {
        fprintf(stderr, "FAIL: unknown set name returned a set\n");
        return 1;
    }
    test_fp16();
    if (!g_fail) test_quantize();
    for (int i = 0; i < nsets && !g_fail; i++) test_set_quantize(sets[i]);
    if (!g_fail) test_matrices(sets, nsets, quick);
    if (g_fail) return 1;
    printf("OK: %ld cases, sets %s all equal to scalar, scalar equal to the reference\n", g_cases, got);
    return 0;
}
