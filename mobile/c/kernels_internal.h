/* Private to the kernel files: how cpu_features.c reaches each compiled-in kernel set, and the scalar pieces
 * the SIMD sets reuse for their tails (rows or tokens that do not fill a SIMD tile). Not part of the engine API. */
#ifndef MMOE_KERNELS_INTERNAL_H
#define MMOE_KERNELS_INTERNAL_H

#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* SIMD helpers must be inlined: GCC -O2 otherwise outlines the big ones (a call, vzeroupper and the accumulators
 * spilled around it every two groups). */
#if defined(__GNUC__) || defined(__clang__)
#define MMOE_INLINE static inline __attribute__((always_inline))
#else
#define MMOE_INLINE static inline
#endif

/* mmoe_quantize_row_q8's scale from the row's NaN-skipping amax, and one element's code (kernels_scalar.c states
 * the rule); the SIMD quantizers use these for the scale and their tails. */
MMOE_INLINE float mmoe_act_scale(float amax) {
    float s = amax / 127.0f;
    if (!(s >= 0x1p-126f)) s = 0x1p-126f;              /* 0 or subnormal: the smallest normal float */
    if (s > 0x1.fffffep+127f) s = 0x1.fffffep+127f;    /* amax = inf: the largest finite float */
    return s;
}
MMOE_INLINE int8_t mmoe_act_code(float x, float s) {
    float v = nearbyintf(x / s); /* default rounding mode: half to even, like torch.round */
    if (v != v) v = 0.0f;        /* NaN element (s is finite and > 0, so only a NaN x gives NaN) */
    if (v < -127.0f) v = -127.0f;
    if (v > 127.0f) v = 127.0f;
    return (int8_t)v;
}

void mmoe_gemv_scalar(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1);
void mmoe_gemm_scalar(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy,
                      int r0, int r1);

/* 8 * (sum of the 32 activations of one group): the offset of the unsigned nibbles w' = q + 8, removed once per
 * (token, group) by the kernels that multiply w' instead of q. */
MMOE_INLINE int32_t mmoe_group_xoff(const int8_t *x) {
    int32_t s = 0;
    for (int i = 0; i < 32; i++) s += x[i];
    return 8 * s;
}

/* The blocking the ARM gemms share (kernels_avx2.c's gemm_avx2 has the same, with its own tile layout), around a
 * 4-row x 4-token tile kernel:
 *   row blocks of ~128 KB of weights (stay in L2) > 4-token tiles (4 * K bytes of activations stay in L1) >
 *   4-row tiles, so each weight byte comes from memory once per call and each output row is written in order.
 * Rows and tokens that do not fill a tile go through the set's gemv (same arithmetic, hence same bits).
 * With with_xo, the tile also gets xo[(t * G + g) * 4 + j] = mmoe_group_xoff of token t, group g (t < 4), stored
 * 4 times (j < 4) so that [group g | group g + 1] for 4 rows is one 32-byte load: a set whose kernel uses the
 * nibbles as unsigned w' = q + 8 subtracts it once per (token, group) instead of per element. Without, xo is
 * NULL and nothing is computed (sets whose tile takes the signed nibble). */
typedef void (*mmoe_tile4x4_fn)(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo,
                                float *Y, int ldy);

#define MMOE_TILE_XO_STACK 256 /* groups (K <= 8192) whose offsets live on the stack (16 KB); more: heap */

static inline void mmoe_gemm_tiled(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y,
                                   int ldy, int r0, int r1, mmoe_tile4x4_fn tile, mmoe_gemv_fn gemv, int with_xo) {
    const int K = W->cols, G = K / 32;
    int mend = M / 4 * 4;
    const int rend = r0 + (r1 - r0) / 4 * 4;
    int rb = K > 0 ? (int)((128u * 1024u) / ((unsigned)K / 2u)) / 4 * 4 : 4;
    if (rb < 4) rb = 4;
    int32_t xo_stack[16 * MMOE_TILE_XO_STACK], *xo = with_xo ? xo_stack : NULL, *xo_heap = NULL;
    if (with_xo && G > MMOE_TILE_XO_STACK) {
        xo = xo_heap = (int32_t *)malloc(sizeof(int32_t) * 16 * (size_t)G);
        if (!xo) mend = 0; /* no memory for the offsets: every token goes through the gemv below (same bits) */
    }
    for (int b0 = r0; b0 < rend && mend > 0; b0 += rb) {
        const int b1 = rend - b0 < rb ? rend : b0 + rb;
        for (int m = 0; m < mend; m += 4) {
            const int8_t *X = Xq + (size_t)m * (size_t)K;
            for (int g = 0; xo && g < 4 * G; g++) { /* 4 consecutive token rows: g runs over all four */
                int32_t o = mmoe_group_xoff(X + 32 * (size_t)g);
                xo[4 * g] = xo[4 * g + 1] = xo[4 * g + 2] = xo[4 * g + 3] = o;
            }
            for (int r = b0; r < b1; r += 4)
                tile(W, r, X, xs + m, xo, Y + (size_t)m * (size_t)ldy + (size_t)(r - r0), ldy);
        }
    }
    free(xo_heap);
    for (int m = 0; m < M; m++) {
        float *ym = Y + (size_t)m * (size_t)ldy;
        const int8_t *xm = Xq + (size_t)m * (size_t)K;
        if (m >= mend) gemv(W, xm, xs[m], ym, r0, r1);                        /* leftover tokens: every row */
        else if (rend < r1) gemv(W, xm, xs[m], ym + (rend - r0), rend, r1);    /* leftover rows */
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#define MMOE_X86 1
const mmoe_kernel_set *mmoe_kernels_avx2_set(void);
#endif

#if defined(__aarch64__)
#define MMOE_ARM64 1
const mmoe_kernel_set *mmoe_kernels_neon_set(void);
const mmoe_kernel_set *mmoe_kernels_dotprod_set(void);
const mmoe_kernel_set *mmoe_kernels_i8mm_set(void);
/* the dotprod gemv, also the i8mm set's decode kernel (compiled with +dotprod in kernels_dotprod.c) */
void mmoe_gemv_dotprod(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1);
#endif

#endif
