/* attention.c: the SIMD attention and router dots over fp32 and fp16 weights (AVX2+F16C or NEON) must equal the
 * scalar reference bit for bit, and the prefill block (mmoe_att_block, SIMD and scalar) must equal mmoe_att_group per query.
 * Build: cc -std=c11 -O2 -ffp-contract=off -I.. test_attention.c ../attention.c -lm   (any ISA; static for qemu)
 * Prints "attention: ok (<cases> cases, impl simd|scalar-only)" and exits 0, or names the first mismatch, exit 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

static unsigned long long rng = 88172645463325252ull;
static unsigned next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng >> 11);
}
static float unif(void) { return (float)(next() & 0xffffff) / 16777216.0f * 2.0f - 1.0f; }

/* random fp16 bits: mostly normal values of moderate size, some subnormals, zeros and large values */
static uint16_t rand_h(void) {
    unsigned r = next() % 100, sign = (next() & 1u) << 15, mant = next() & 0x3ffu;
    if (r < 5) return (uint16_t)(sign | mant);                        /* subnormal / zero */
    if (r < 8) return (uint16_t)(sign | (28u << 10) | mant);          /* large (~2^13) */
    return (uint16_t)(sign | ((unsigned)(10 + next() % 8) << 10) | mant); /* 2^-5 .. 2^2 */
}

/* IEEE half -> float by arithmetic (independent of attention.c's bit-level conversion) */
static float h2f_ref(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(1024 + m), e - 25);
    return (h & 0x8000) ? -v : v;
}

static int same(float a, float b) { return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b)); }

int main(void) {
    int simd = mmoe_att_best_impl(), cases = 0;
    static float q[256], a[1024], b[1024], sc0[600], sc1[600], o0[256], o1[256];
    static uint16_t kc[600 * 256], vc[600 * 256];
    for (int n = 1; n <= 1024; n += (n < 40 ? 1 : 37)) { /* router-style dots, every tail length */
        for (int i = 0; i < n; i++) {
            a[i] = unif() * 3.0f;
            b[i] = unif() * 0.05f;
        }
        float r0 = mmoe_dot_f32(a, b, n, MMOE_ATT_SCALAR), r1 = mmoe_dot_f32(a, b, n, simd);
        if (!same(r0, r1)) {
            printf("dot_f32 mismatch n=%d: scalar %.9g simd %.9g\n", n, r0, r1);
            return 1;
        }
        cases++;
    }
    /* fp16 router dots: SIMD == scalar, and == the fp32 dot of the exactly converted weights (the arithmetic
     * mmoe_dot_f16 promises), over every tail length and the preset widths (S: 1280) */
    static uint16_t bh[2048];
    static float bf[2048], a2[2048];
    for (int n = 1; n <= 2048; n += (n < 40 ? 1 : n == 1261 ? 19 : 37)) {
        for (int i = 0; i < n; i++) {
            a2[i] = unif() * 3.0f;
            bh[i] = rand_h();
            bf[i] = h2f_ref(bh[i]);
        }
        float r0 = mmoe_dot_f16(a2, bh, n, MMOE_ATT_SCALAR), r1 = mmoe_dot_f16(a2, bh, n, simd);
        float r2 = mmoe_dot_f32(a2, bf, n, MMOE_ATT_SCALAR);
        if (!same(r0, r1) || !same(r0, r2)) {
            printf("dot_f16 mismatch n=%d: scalar %.9g simd %.9g f32-of-converted %.9g\n", n, r0, r1, r2);
            return 1;
        }
        cases++;
    }
    int hds[] = {8, 16, 24, 32, 64, 72, 128, 6, 10};
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++) {
        int hd = hds[hi];
        for (int keys = 1; keys <= 600; keys = keys * 3 + 1) {
            size_t stride = (size_t)hd * 2 + (hd & 7); /* a KV row holding more than one head */
            for (size_t i = 0; i < (size_t)keys * stride; i++) {
                kc[i] = rand_h();
                vc[i] = rand_h();
            }
            for (int d = 0; d < hd; d++) q[d] = unif() * 2.0f;
            float scale = 1.0f / sqrtf((float)hd);
            mmoe_att_head(q, kc + hd, vc + hd, stride, keys, hd, scale, sc0, o0, MMOE_ATT_SCALAR);
            mmoe_att_head(q, kc + hd, vc + hd, stride, keys, hd, scale, sc1, o1, simd);
            for (int d = 0; d < hd; d++)
                if (!same(o0[d], o1[d])) {
                    printf("attention mismatch hd=%d keys=%d d=%d: scalar %.9g simd %.9g\n", hd, keys, d, o0[d], o1[d]);
                    return 1;
                }
            cases++;
            /* GQA groups of ng heads sharing the KV head: each head equals the single-head scalar result */
            static float qg[5 * 256], og[5 * 256], o1h[256], scg[5 * 600];
            for (int ng = 1; ng <= 5; ng++) {
                for (int i = 0; i < ng * hd; i++) qg[i] = unif() * 2.0f;
                mmoe_att_group(qg, ng, kc + hd, vc + hd, stride, keys, hd, scale, scg, og, simd);
                for (int j = 0; j < ng; j++) {
                    mmoe_att_head(qg + j * hd, kc + hd, vc + hd, stride, keys, hd, scale, sc0, o1h, MMOE_ATT_SCALAR);
                    if (memcmp(o1h, og + j * hd, sizeof(float) * (size_t)hd)) {
                        printf("group mismatch hd=%d keys=%d ng=%d head=%d\n", hd, keys, ng, j);
                        return 1;
                    }
                }
                cases++;
            }
        }
    }
    /* prefill blocks: nq query tokens x ng heads, query b seeing n0 + b keys (causal edges: n0 = 1, blocks that
     * fill or overrun a tile, several tiles): SIMD block == scalar block == per-query mmoe_att_group. An inf in the
     * last value row, visible only to the last query, must not reach the earlier ones. */
    static uint16_t kb[80 * 160], vb[80 * 160];
    static float qb[19 * (6 * 128 + 8)], ob0[19 * (6 * 128 + 8)], ob1[19 * (6 * 128 + 8)], og1[6 * 128], scb[8 * 80], scq[6 * 80];
    int bhds[] = {64, 8, 16, 128, 24, 10};
    for (size_t hi = 0; hi < sizeof bhds / sizeof bhds[0]; hi++) {
        int hd = bhds[hi];
        size_t stride = (size_t)hd + 8 * (hi & 1); /* head-contiguous (the engine's) and interleaved rows */
        float scale = 1.0f / sqrtf((float)hd);
        int n0s[] = {1, 2, 7, 33, 60};
        for (size_t ni = 0; ni < sizeof n0s / sizeof n0s[0]; ni++)
            for (int nq = 1; nq <= 19; nq += (nq < 9 ? 1 : 5))
                for (int ng = 1; ng <= 6; ng++) {
                    int n0 = n0s[ni], nmax = n0 + nq - 1, inf = (nq + ng) % 4 == 0;
                    size_t qs = (size_t)ng * hd + 3 * (size_t)(ng & 1), os = (size_t)ng * hd + 5;
                    for (size_t i = 0; i < (size_t)nmax * stride; i++) {
                        kb[i] = rand_h();
                        vb[i] = rand_h();
                    }
                    if (inf && nq > 1) vb[(size_t)(nmax - 1) * stride + 1] = 0x7c00u;
                    for (size_t i = 0; i < (size_t)nq * qs; i++) qb[i] = unif() * 2.0f;
                    mmoe_att_block(qb, qs, nq, ng, kb, vb, stride, n0, hd, scale, scb, ob0, os, MMOE_ATT_SCALAR);
                    mmoe_att_block(qb, qs, nq, ng, kb, vb, stride, n0, hd, scale, scb, ob1, os, simd);
                    for (int b = 0; b < nq; b++) {
                        mmoe_att_group(qb + (size_t)b * qs, ng, kb, vb, stride, n0 + b, hd, scale, scq, og1, simd);
                        for (int d = 0; d < ng * hd; d++) {
                            float g = og1[d], r0 = ob0[(size_t)b * os + (size_t)d], r1 = ob1[(size_t)b * os + (size_t)d];
                            if (!same(g, r0) || !same(g, r1)) {
                                printf("block mismatch hd=%d n0=%d nq=%d ng=%d query=%d elem=%d: group %.9g block "
                                       "scalar %.9g block simd %.9g\n", hd, n0, nq, ng, b, d, g, r0, r1);
                                return 1;
                            }
                        }
                        if (inf && b < nq - 1 && !isfinite(og1[1])) {
                            printf("block: inf reached query %d of %d (hd=%d)\n", b, nq, hd);
                            return 1;
                        }
                    }
                    cases++;
                }
    }
    printf("attention: ok (%d cases, impl %s)\n", cases, simd == MMOE_ATT_SIMD ? "simd" : "scalar-only");
    return 0;
}
