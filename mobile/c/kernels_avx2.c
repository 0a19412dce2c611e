/* x86-64 AVX2 (+F16C) kernels. Built with -mavx2 -mfma -mf16c for this file only; cpu_features.c hands the set
 * out only when cpuid/xgetbv say the CPU and OS support it.
 *
 * Integer part: a weight nibble is used as the unsigned byte w' = q + 8 in [0, 15], so one maddubs (u8 x s8)
 * gives exact int16 pair sums (|.| <= 2 * 15 * 127); the +8 offset is removed with 8 * sum(x over the group).
 * Float part: 8 rows live in the 8 lanes of one fp32 accumulator, each lane doing acc = acc + isum * d in group
 * order: exactly the scalar sequence per row, hence bit-identical results. */
#include <math.h>
#include <string.h>

#include "kernels_internal.h"

#if defined(MMOE_X86)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.c needs -mavx2 -mfma -mf16c (MMOE_KFLAGS in kernels.mk)"
#endif
#include <immintrin.h>

#define XOFF_CHUNK 256 /* groups whose activation sums are precomputed at a time (K up to 8192 in one chunk) */

MMOE_INLINE __m256i unpack_group(const uint8_t *p, __m256i m4) {
    /* 16 bytes -> [w'0..w'15 | w'16..w'31] */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(both, m4);
}

/* Four rows' int16 pair-sum vectors -> int32 [row0..row3 of the low 128-bit half | row0..row3 of the high half].
 * Two hadd_epi16 levels then one madd: callers guarantee every input lane is within +-7620, so the int16
 * levels stay within +-30480 (no wrap-around) and the result is exact. */
MMOE_INLINE __m256i reduce4_i16(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(s0, s1), _mm256_hadd_epi16(s2, s3));
    return _mm256_madd_epi16(h, _mm256_set1_epi16(1));
}

/* Scales of 8 rows x 8 groups (fp16, row stride G) -> sc[j][i] = scale of row i, group j, as fp32. */
MMOE_INLINE void load_scales_8x8(const mmoe_fp16 *d, int G, float sc[8][8]) {
    __m128i a0 = _mm_loadu_si128((const __m128i *)(d + 0 * (size_t)G));
    __m128i a1 = _mm_loadu_si128((const __m128i *)(d + 1 * (size_t)G));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(d + 2 * (size_t)G));
    __m128i a3 = _mm_loadu_si128((const __m128i *)(d + 3 * (size_t)G));
    __m128i a4 = _mm_loadu_si128((const __m128i *)(d + 4 * (size_t)G));
    __m128i a5 = _mm_loadu_si128((const __m128i *)(d + 5 * (size_t)G));
    __m128i a6 = _mm_loadu_si128((const __m128i *)(d + 6 * (size_t)G));
    __m128i a7 = _mm_loadu_si128((const __m128i *)(d + 7 * (size_t)G));
    __m128i t0 = _mm_unpacklo_epi16(a0, a1), t1 = _mm_unpackhi_epi16(a0, a1);
    __m128i t2 = _mm_unpacklo_epi16(a2, a3), t3 = _mm_unpackhi_epi16(a2, a3);
    __m128i t4 = _mm_unpacklo_epi16(a4, a5), t5 = _mm_unpackhi_epi16(a4, a5);
    __m128i t6 = _mm_unpacklo_epi16(a6, a7), t7 = _mm_unpackhi_epi16(a6, a7);
    __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    _mm256_storeu_ps(sc[0], _mm256_cvtph_ps(_mm_unpacklo_epi64(u0, u4)));
    _mm256_storeu_ps(sc[1], _mm256_cvtph_ps(_mm_unpackhi_epi64(u0, u4)));
    _mm256_storeu_ps(sc[2], _mm256_cvtph_ps(_mm_unpacklo_epi64(u1, u5)));
    _mm256_storeu_ps(sc[3], _mm256_cvtph_ps(_mm_unpackhi_epi64(u1, u5)));
    _mm256_storeu_ps(sc[4], _mm256_cvtph_ps(_mm_unpacklo_epi64(u2, u6)));
    _mm256_storeu_ps(sc[5], _mm256_cvtph_ps(_mm_unpackhi_epi64(u2, u6)));
    _mm256_storeu_ps(sc[6], _mm256_cvtph_ps(_mm_unpacklo_epi64(u3, u7)));
    _mm256_storeu_ps(sc[7], _mm256_cvtph_ps(_mm_unpackhi_epi64(u3, u7)));
}

/* Scales of 8 rows x 4 groups -> sc[j][i] = scale of row i, group j (for K/32 not a multiple of 8, e.g. K = 160) */
MMOE_INLINE void load_scales_8x4(const mmoe_fp16 *d, int G, float sc[4][8]) {
    __m128i a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm_loadl_epi64((const __m128i *)(d + (size_t)i * (size_t)G));
    __m128i t0 = _mm_unpacklo_epi16(a[0], a[1]), t1 = _mm_unpacklo_epi16(a[2], a[3]);
    __m128i t2 = _mm_unpacklo_epi16(a[4], a[5]), t3 = _mm_unpacklo_epi16(a[6], a[7]);
    __m128i u0 = _mm_unpacklo_epi32(t0, t1), u1 = _mm_unpackhi_epi32(t0, t1); /* rows 0-3: groups 0,1 | 2,3 */
    __m128i u2 = _mm_unpacklo_epi32(t2, t3), u3 = _mm_unpackhi_epi32(t2, t3); /* rows 4-7 */
    _mm256_storeu_ps(sc[0], _mm256_cvtph_ps(_mm_unpacklo_epi64(u0, u2)));
    _mm256_storeu_ps(sc[1], _mm256_cvtph_ps(_mm_unpackhi_epi64(u0, u2)));
    _mm256_storeu_ps(sc[2], _mm256_cvtph_ps(_mm_unpacklo_epi64(u1, u3)));
    _mm256_storeu_ps(sc[3], _mm256_cvtph_ps(_mm_unpackhi_epi64(u1, u3)));
}

MMOE_INLINE __m256 scales_col8(const mmoe_fp16 *d, int G) {
    __m128i h = _mm_setr_epi16((short)d[0], (short)d[(size_t)G], (short)d[2 * (size_t)G], (short)d[3 * (size_t)G],
                               (short)d[4 * (size_t)G], (short)d[5 * (size_t)G], (short)d[6 * (size_t)G],
                               (short)d[7 * (size_t)G]);
    return _mm256_cvtph_ps(h);
}

/* One row, two consecutive groups: int16 lanes of 4 products w' * x each, |.| <= 4 * 15 * 127 = 7620 */
MMOE_INLINE __m256i row_g2(const uint8_t *q, __m256i xlo, __m256i xhi, __m256i m4) {
    __m256i v = _mm256_loadu_si256((const __m256i *)q); /* nibbles of g0 | g1 */
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
}

/* Prefetch 4 cache lines (256 bytes) of the next 8-row block, walking it in address order: step j of a block
 * (two groups, j = g / 2) touches bytes [256 j, 256 j + 256) of the next block, so the next block (8 rows x K/2
 * bytes, contiguous in the row-major layout) is requested linearly one block ahead while this one is computed.
 * The 8 interleaved 640-byte row streams of a block are too short for the hardware prefetcher to train on.
 * Measured here (2-vCPU EPYC VM, bench_kernels, 1 thread, ring of matrices from DRAM): 320 x 1280 and
 * 1280 x 1280 gemv at 9.6-11.4 GB/s with no or column-wise prefetching of the next block (8 rows at the same K
 * offset), 14-16 GB/s with this linear walk (plain AVX2 read of the same memory: 15-19 GB/s).
 * Integer arithmetic: the address may lie past the matrix (prefetch never faults), and forming an out-of-range
 * pointer would be undefined behaviour. */
MMOE_INLINE void prefetch_256(uintptr_t p) {
    /* asm, not _mm_prefetch: GCC 12 -O2 dead-code-eliminated the builtin prefetches in this file */
    __asm__ volatile("prefetcht0 (%0)\n\t"
                     "prefetcht0 64(%0)\n\t"
                     "prefetcht0 128(%0)\n\t"
                     "prefetcht0 192(%0)"
                     :
                     : "r"(p));
}

/* 8 rows (row stride rowb bytes), two consecutive groups: integer sums w'.x per row, lane = row.
 * Written out row by row: at -O2 GCC keeps a loop here and round-trips the 8 vectors through the stack. */
MMOE_INLINE void dot8_g2(const uint8_t *q, size_t rowb, const int8_t *x, __m256i *i0, __m256i *i1, uintptr_t pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i xa = _mm256_loadu_si256((const __m256i *)x), xb = _mm256_loadu_si256((const __m256i *)(x + 32));
    __m256i xlo = _mm256_permute2x128_si256(xa, xb, 0x20); /* [g0 x0..15 | g1 x0..15] */
    __m256i xhi = _mm256_permute2x128_si256(xa, xb, 0x31); /* [g0 x16..31 | g1 x16..31] */
    prefetch_256(pf);
    __m256i t0 = reduce4_i16(row_g2(q, xlo, xhi, m4), row_g2(q + rowb, xlo, xhi, m4),
                             row_g2(q + 2 * rowb, xlo, xhi, m4), row_g2(q + 3 * rowb, xlo, xhi, m4));
    __m256i t1 = reduce4_i16(row_g2(q + 4 * rowb, xlo, xhi, m4), row_g2(q + 5 * rowb, xlo, xhi, m4),
                             row_g2(q + 6 * rowb, xlo, xhi, m4), row_g2(q + 7 * rowb, xlo, xhi, m4));
    /* t0 = [rows 0-3 of g0 | rows 0-3 of g1], t1 likewise for rows 4-7 */
    *i0 = _mm256_permute2x128_si256(t0, t1, 0x20);
    *i1 = _mm256_permute2x128_si256(t0, t1, 0x31);
}

/* One row, one group: int16 lanes of 2 products, |.| <= 3810 */
MMOE_INLINE __m256i row_g1(const uint8_t *q, __m256i xv, __m256i m4) {
    return _mm256_maddubs_epi16(unpack_group(q, m4), xv);
}

MMOE_INLINE __m256i dot8_g1(const uint8_t *q, size_t rowb, const int8_t *x, uintptr_t pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    prefetch_256(pf);
    __m256i t0 = reduce4_i16(row_g1(q, xv, m4), row_g1(q + rowb, xv, m4), row_g1(q + 2 * rowb, xv, m4),
                             row_g1(q + 3 * rowb, xv, m4)); /* [rows 0-3, elements 0-15 | rows 0-3, elements 16-31] */
    __m256i t1 = reduce4_i16(row_g1(q + 4 * rowb, xv, m4), row_g1(q + 5 * rowb, xv, m4),
                             row_g1(q + 6 * rowb, xv, m4), row_g1(q + 7 * rowb, xv, m4));
    return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

MMOE_INLINE __m256 step(__m256 acc, __m256i isum_off, int32_t xoff, __m256 sc) {
    __m256i isum = _mm256_sub_epi32(isum_off, _mm256_set1_epi32(xoff));
    return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), sc));
}

static void gemv_avx2(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    const int K = W->cols, G = K / 32;
    const size_t rowb = (size_t)K / 2;
    const int rend = r0 + (r1 - r0) / 8 * 8;
    if (G == 0) { /* nothing to stream: the scalar path writes the zeros */
        mmoe_gemv_scalar(W, xq, xs, y, r0, r1);
        return;
    }
    for (int c0 = 0; c0 < G; c0 += XOFF_CHUNK) {
        const int c1 = G - c0 < XOFF_CHUNK ? G : c0 + XOFF_CHUNK;
        int32_t xoff[XOFF_CHUNK];
        for (int g = c0; g < c1; g++) xoff[g - c0] = mmoe_group_xoff(xq + 32 * (size_t)g);
        for (int r = r0; r < rend; r += 8) {
            /* between chunks the running fp32 sums wait in y: a store/load is exact */
            __m256 acc = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + (r - r0));
            const uint8_t *q = W->qs + (size_t)r * rowb;
            const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
            const uintptr_t pf = (uintptr_t)q + 8 * rowb; /* the next block */
            int g = c0;
            for (; g + 8 <= c1; g += 8) {
                float sc[8][8];
                load_scales_8x8(d + g, G, sc);
                for (int j = 0; j < 8; j += 2) {
                    __m256i a, b;
                    dot8_g2(q + 16 * (size_t)(g + j), rowb, xq + 32 * (size_t)(g + j), &a, &b,
                            pf + 128 * (size_t)(g + j));
                    acc = step(acc, a, xoff[g + j - c0], _mm256_loadu_ps(sc[j]));
                    acc = step(acc, b, xoff[g + j + 1 - c0], _mm256_loadu_ps(sc[j + 1]));
                }
            }
            for (; g + 4 <= c1; g += 4) {
                float sc[4][8];
                load_scales_8x4(d + g, G, sc);
                for (int j = 0; j < 4; j += 2) {
                    __m256i a, b;
                    dot8_g2(q + 16 * (size_t)(g + j), rowb, xq + 32 * (size_t)(g + j), &a, &b,
                            pf + 128 * (size_t)(g + j));
                    acc = step(acc, a, xoff[g + j - c0], _mm256_loadu_ps(sc[j]));
                    acc = step(acc, b, xoff[g + j + 1 - c0], _mm256_loadu_ps(sc[j + 1]));
                }
            }
            for (; g < c1; g++) {
                __m256i a = dot8_g1(q + 16 * (size_t)g, rowb, xq + 32 * (size_t)g, pf + 128 * (size_t)g);
                acc = step(acc, a, xoff[g - c0], scales_col8(d + g, G));
            }
            _mm256_storeu_ps(y + (r - r0), acc);
        }
    }
    const __m256 vxs = _mm256_set1_ps(xs);
    for (int r = r0; r < rend; r += 8)
        _mm256_storeu_ps(y + (r - r0), _mm256_mul_ps(_mm256_loadu_ps(y + (r - r0)), vxs));
    if (rend < r1) mmoe_gemv_scalar(W, xq, xs, y + (rend - r0), rend, r1);
}

/* One token against 4 unpacked weight rows (one group): [rows 0-3, elements 0-15 | rows 0-3, elements 16-31] */
MMOE_INLINE __m256i tok4(__m256i w0, __m256i w1, __m256i w2, __m256i w3, const int8_t *x, __m256i eights) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    __m256i c = _mm256_maddubs_epi16(eights, xv); /* removes the +8 of w' pairwise, exactly, in int16 */
    /* int16 lanes: 2 products (w' - 8) * x, |.| <= 2032 */
    __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(w0, xv), c);
    __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(w1, xv), c);
    __m256i p2 = _mm256_sub_epi16(_mm256_maddubs_epi16(w2, xv), c);
    __m256i p3 = _mm256_sub_epi16(_mm256_maddubs_epi16(w3, xv), c);
    return reduce4_i16(p0, p1, p2, p3);
}

/* One token, two groups, against 4 rows' unpacked nibbles (lo_r = [g0 w'0..15 | g1 w'0..15], hi_r = elements
 * 16..31): [rows 0-3 of g0 | rows 0-3 of g1] of sum w' * x - xo, where xo2 = [8 * sum x of g0 (x4) | of g1 (x4)].
 * xp is the token's group pair already in the tile layout (gemm_avx2: [g0 x0..15 | g1 x0..15 | g0 x16..31 |
 * g1 x16..31]), so the activations are two plain loads. int16 lanes hold 4 products w' * x, |.| <= 7620, the
 * bound reduce4_i16 needs; the +8 offset is removed once per (token, group) in int32, as the gemv does. */
MMOE_INLINE __m256i tok4_g2(const __m256i lo[4], const __m256i hi[4], const int8_t *xp, __m256i xo2) {
    __m256i xlo = _mm256_loadu_si256((const __m256i *)xp), xhi = _mm256_loadu_si256((const __m256i *)(xp + 32));
    __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], xlo), _mm256_maddubs_epi16(hi[0], xhi));
    __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[1], xlo), _mm256_maddubs_epi16(hi[1], xhi));
    __m256i p2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[2], xlo), _mm256_maddubs_epi16(hi[2], xhi));
    __m256i p3 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[3], xlo), _mm256_maddubs_epi16(hi[3], xhi));
    return _mm256_sub_epi32(reduce4_i16(p0, p1, p2, p3), xo2);
}

/* [offset of group g (x4) | of group g + 1 (x4)]: xo holds every offset 4 times (gemm_avx2) */
MMOE_INLINE __m256i xo_pair(const int32_t *xo) { return _mm256_loadu_si256((const __m256i *)(const void *)xo); }

/* acc = acc + isum * d for two tokens' 4 rows, one group (half 0x20) or the next (0x31): lanes [tok a | tok b] */
#define TILE_STEP(acc, sa_, sb_, half, sc) \
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(sa_, sb_, half)), sc))

/* 4 rows x nt tokens (nt = 2..4, a constant after inlining; 1 works too): the 4 rows' nibbles are unpacked once
 * per group pair and used by every token of the tile, so 2-3 tokens left over by M % 4 share the unpack (and the
 * L2-hot row block) instead of going through a gemv each. Xp: the tokens in the tile layout (row stride K); xo: their group
 * offsets; Y points at (token 0, row 0). Per (row, token) the sequence is kernels.h's: groups in order, then xs. */
MMOE_INLINE void tile_4xn(const mmoe_q4_matrix *W, int r, const int8_t *Xp, const float *xs, const int32_t *xo,
                          float *Y, int ldy, const int nt) {
    const int K = W->cols, G = K / 32;
    const size_t rowb = (size_t)K / 2;
    const __m256i m4 = _mm256_set1_epi8(0x0f), eights = _mm256_set1_epi8(8), z = _mm256_setzero_si256();
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    const int8_t *X1 = Xp + (size_t)K, *X2 = Xp + 2 * (size_t)K, *X3 = Xp + 3 * (size_t)K;
    __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps(); /* lanes: [tok0 rows0-3 | tok1 rows0-3] */
    int g = 0;
    for (; g + 2 <= G; g += 2) {
        __m256i lo[4], hi[4];
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(q + (size_t)i * rowb + 16 * (size_t)g));
            lo[i] = _mm256_and_si256(v, m4);
            hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        __m256 sa = _mm256_cvtph_ps(_mm_setr_epi16((short)d[g], (short)d[G + g], (short)d[2 * (size_t)G + g],
                                                   (short)d[3 * (size_t)G + g], (short)d[g], (short)d[G + g],
                                                   (short)d[2 * (size_t)G + g], (short)d[3 * (size_t)G + g]));
        __m256 sb = _mm256_cvtph_ps(_mm_setr_epi16(
            (short)d[g + 1], (short)d[G + g + 1], (short)d[2 * (size_t)G + g + 1], (short)d[3 * (size_t)G + g + 1],
            (short)d[g + 1], (short)d[G + g + 1], (short)d[2 * (size_t)G + g + 1], (short)d[3 * (size_t)G + g + 1]));
        const size_t xg = 32 * (size_t)g;
        const int32_t *xog = xo + 4 * (size_t)g;
        __m256i s0 = tok4_g2(lo, hi, Xp + xg, xo_pair(xog));
        __m256i s1 = nt > 1 ? tok4_g2(lo, hi, X1 + xg, xo_pair(xog + 4 * (size_t)G)) : z;
        /* s_m = [tok m: rows 0-3 of g | rows 0-3 of g+1] -> per group [tok0 | tok1], [tok2 | tok3] */
        TILE_STEP(acc01, s0, s1, 0x20, sa);
        if (nt > 2) {
            __m256i s2 = tok4_g2(lo, hi, X2 + xg, xo_pair(xog + 8 * (size_t)G));
            __m256i s3 = nt > 3 ? tok4_g2(lo, hi, X3 + xg, xo_pair(xog + 12 * (size_t)G)) : z;
            TILE_STEP(acc23, s2, s3, 0x20, sa);
            TILE_STEP(acc01, s0, s1, 0x31, sb);
            TILE_STEP(acc23, s2, s3, 0x31, sb);
        } else {
            TILE_STEP(acc01, s0, s1, 0x31, sb);
        }
    }
    for (; g < G; g++) { /* an odd last group, kept in the plain layout */
        __m256i w0 = unpack_group(q + 16 * (size_t)g, m4), w1 = unpack_group(q + rowb + 16 * (size_t)g, m4);
        __m256i w2 = unpack_group(q + 2 * rowb + 16 * (size_t)g, m4);
        __m256i w3 = unpack_group(q + 3 * rowb + 16 * (size_t)g, m4);
        __m128i dh = _mm_setr_epi16((short)d[g], (short)d[G + g], (short)d[2 * (size_t)G + g],
                                    (short)d[3 * (size_t)G + g], (short)d[g], (short)d[G + g],
                                    (short)d[2 * (size_t)G + g], (short)d[3 * (size_t)G + g]);
        __m256 sc = _mm256_cvtph_ps(dh);
        const size_t xg = 32 * (size_t)g;
        __m256i s0 = tok4(w0, w1, w2, w3, Xp + xg, eights);
        __m256i s1 = nt > 1 ? tok4(w0, w1, w2, w3, X1 + xg, eights) : z;
        __m256i v01 = _mm256_add_epi32(_mm256_permute2x128_si256(s0, s1, 0x20),
                                       _mm256_permute2x128_si256(s0, s1, 0x31)); /* [tok0 rows 0-3 | tok1] */
        acc01 = _mm256_add_ps(acc01, _mm256_mul_ps(_mm256_cvtepi32_ps(v01), sc));
        if (nt > 2) {
            __m256i s2 = tok4(w0, w1, w2, w3, X2 + xg, eights);
            __m256i s3 = nt > 3 ? tok4(w0, w1, w2, w3, X3 + xg, eights) : z;
            __m256i v23 = _mm256_add_epi32(_mm256_permute2x128_si256(s2, s3, 0x20),
                                           _mm256_permute2x128_si256(s2, s3, 0x31));
            acc23 = _mm256_add_ps(acc23, _mm256_mul_ps(_mm256_cvtepi32_ps(v23), sc));
        }
    }
    const float x1 = nt > 1 ? xs[1] : 0.0f, x2 = nt > 2 ? xs[2] : 0.0f, x3 = nt > 3 ? xs[3] : 0.0f;
    acc01 = _mm256_mul_ps(acc01, _mm256_setr_ps(xs[0], xs[0], xs[0], xs[0], x1, x1, x1, x1));
    _mm_storeu_ps(Y, _mm256_castps256_ps128(acc01));
    if (nt > 1) _mm_storeu_ps(Y + ldy, _mm256_extractf128_ps(acc01, 1));
    if (nt > 2) {
        acc23 = _mm256_mul_ps(acc23, _mm256_setr_ps(x2, x2, x2, x2, x3, x3, x3, x3));
        _mm_storeu_ps(Y + 2 * (size_t)ldy, _mm256_castps256_ps128(acc23));
    }
    if (nt > 3) _mm_storeu_ps(Y + 3 * (size_t)ldy, _mm256_extractf128_ps(acc23, 1));
}
#undef TILE_STEP

static void tile_4x2(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo, float *Y,
                     int ldy) {
    tile_4xn(W, r, X, xs, xo, Y, ldy, 2);
}
static void tile_4x3(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo, float *Y,
                     int ldy) {
    tile_4xn(W, r, X, xs, xo, Y, ldy, 3);
}
static void tile_4x4(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo, float *Y,
                     int ldy) {
    tile_4xn(W, r, X, xs, xo, Y, ldy, 4);
}

#define TILE_STACK_G 64 /* groups (K <= 2048) whose tile activations and offsets live on the stack (12 KB) */

/* The AVX2 gemm driver (mmoe_gemm_tiled's blocking, with its own tile layout): row blocks of ~128 KB of weights
 * (stay in L2) > tiles of up to 4 tokens > 4-row tiles. Per block and token tile, the tokens are copied once into
 * the tile layout (each group pair as [g x0..15 | g+1 x0..15 | g x16..31 | g+1 x16..31], an odd last group as
 * is) with their group offsets, instead of every 4-row tile permuting them again. The last 1-3 tokens take the
 * 4x2 / 4x3 tile, a last single token the gemv, as do rows that do not fill a 4-row tile (same arithmetic). */
static void gemm_avx2(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy, int r0,
                      int r1) {
    const int K = W->cols, G = K / 32;
    const int rend = r0 + (r1 - r0) / 4 * 4;
    int rb = K > 0 ? (int)((128u * 1024u) / ((unsigned)K / 2u)) / 4 * 4 : 4;
    if (rb < 4) rb = 4;
    int8_t xp_stack[4 * 32 * TILE_STACK_G];
    int32_t xo_stack[16 * TILE_STACK_G];
    int8_t *xp = xp_stack, *heap = NULL;
    int32_t *xo = xo_stack;
    /* tokens the tiles take; the others take the gemv: a last single token (its 8-row gemv beats a 4x1 tile,
     * which unpacks each weight for one token) and, without memory for the tile layout, every token */
    int mtile = G > 0 ? (M % 4 == 1 ? M - 1 : M) : 0;
    if (G > TILE_STACK_G) {
        heap = malloc(4 * (size_t)K + sizeof(int32_t) * 16 * (size_t)G);
        if (heap) {
            xp = heap;
            xo = (int32_t *)(void *)(heap + 4 * (size_t)K); /* 4 K is a multiple of 128: aligned for int32 */
        } else {
            mtile = 0; /* no memory for the tile layout: every token goes through the gemv below (same bits) */
        }
    }
    static void (*const tiles[4])(const mmoe_q4_matrix *, int, const int8_t *, const float *, const int32_t *,
                                  float *, int) = {NULL, tile_4x2, tile_4x3, tile_4x4};
    for (int b0 = r0; b0 < rend && mtile > 0; b0 += rb) {
        const int b1 = rend - b0 < rb ? rend : b0 + rb;
        for (int m = 0; m < mtile; m += 4) {
            const int nt = mtile - m < 4 ? mtile - m : 4;
            for (int t = 0; t < nt; t++) {
                const int8_t *x = Xq + (size_t)(m + t) * (size_t)K;
                int8_t *o = xp + (size_t)t * (size_t)K;
                int g = 0;
                for (; g + 2 <= G; g += 2) {
                    memcpy(o + 32 * (size_t)g, x + 32 * (size_t)g, 16);
                    memcpy(o + 32 * (size_t)g + 16, x + 32 * (size_t)g + 32, 16);
                    memcpy(o + 32 * (size_t)g + 32, x + 32 * (size_t)g + 16, 16);
                    memcpy(o + 32 * (size_t)g + 48, x + 32 * (size_t)g + 48, 16);
                }
                if (g < G) memcpy(o + 32 * (size_t)g, x + 32 * (size_t)g, 32);
                for (g = 0; g < G; g++) {
                    int32_t v = mmoe_group_xoff(x + 32 * (size_t)g);
                    int32_t *p = xo + 4 * ((size_t)t * (size_t)G + (size_t)g);
                    p[0] = p[1] = p[2] = p[3] = v;
                }
            }
            float *ym = Y + (size_t)m * (size_t)ldy;
            for (int r = b0; r < b1; r += 4) tiles[nt - 1](W, r, xp, xs + m, xo, ym + (size_t)(r - r0), ldy);
        }
    }
    free(heap);
    for (int m = 0; m < M; m++) {
        float *ym = Y + (size_t)m * (size_t)ldy;
        const int8_t *xm = Xq + (size_t)m * (size_t)K;
        if (m >= mtile) gemv_avx2(W, xm, xs[m], ym, r0, r1);                      /* no tile: every row */
        else if (rend < r1) gemv_avx2(W, xm, xs[m], ym + (rend - r0), rend, r1);  /* leftover rows */
    }
}

/* mmoe_quantize_row_q8 in AVX2, the same bytes and scale: max over |x| skipping NaN (maxps returns its second
 * operand when one is NaN, so max(|x|, acc) keeps acc as the scalar `a > amax` does), the scalar's scale clamp,
 * the IEEE division x / s, roundps to nearest-even (nearbyintf in the default mode), NaN codes zeroed by an
 * ordered-compare mask, and the clamp. Prefill quantizes every activation row; the scalar loop was 7% of an S
 * prefill. */
static float quantize_avx2(const float *x, int8_t *q, int K) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 am = _mm256_setzero_ps();
    int K8 = K & ~7, i;
    for (i = 0; i < K8; i += 8) am = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), am);
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, am);
    for (int l = 0; l < 8; l++)
        if (lanes[l] > amax) amax = lanes[l];
    for (int j = K8; j < K; j++) {
        float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    float s = mmoe_act_scale(amax);
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (i = 0; i + 32 <= K; i += 32) {
        __m256i v[4];
        for (int u = 0; u < 4; u++) {
            __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * u), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q)); /* NaN -> +0 */
            v[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        /* packs work per 128-bit lane: [0a 1a 0b 1b] words, then [0a 1a 2a 3a 0b 1b 2b 3b] dwords of bytes */
        __m256i w01 = _mm256_packs_epi32(v[0], v[1]), w23 = _mm256_packs_epi32(v[2], v[3]);
        __m256i b = _mm256_packs_epi16(w01, w23);
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + i), b);
    }
    for (; i < K; i++) q[i] = mmoe_act_code(x[i], s);
    return s;
}

static const mmoe_kernel_set avx2_set = {"avx2", gemv_avx2, gemm_avx2, quantize_avx2};

const mmoe_kernel_set *mmoe_kernels_avx2_set(void) { return &avx2_set; }

#else
typedef int mmoe_kernels_avx2_unused; /* not an x86-64 build: this file is empty */
#endif
