/* aarch64 baseline NEON (ARMv8.0, e.g. Cortex-A53): int8 x int8 products with vmull/vmlal into int16
 * (four products per lane, |.| <= 4 * 8 * 127 = 4064, no overflow), widened pairwise to int32.
 * Four rows share one fp32 vector accumulator, lane = row, so each lane follows the scalar sequence exactly. */
#include "kernels_internal.h"

#if defined(MMOE_ARM64)
#include "kernels_arm.h"

MMOE_INLINE int32x4_t dot_group(const uint8_t *q, int8x16_t xl, int8x16_t xh) {
    int8x16_t wl, wh;
    mmoe_unpack_q4(q, &wl, &wh);
    int16x8_t p = vmull_s8(vget_low_s8(wl), vget_low_s8(xl));
    p = vmlal_high_s8(p, wl, xl);
    p = vmlal_s8(p, vget_low_s8(wh), vget_low_s8(xh));
    p = vmlal_high_s8(p, wh, xh);
    return vpaddlq_s16(p);
}

/* prefill: 4 rows starting at row r, one token, signed nibbles: the fp32 accumulators (not yet times xs) */
MMOE_INLINE float32x4_t rows4(const mmoe_q4_matrix *W, int r, const int8_t *x) {
    const int G = W->cols / 32;
    const size_t rowb = (size_t)W->cols / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int g = 0; g < G; g++) {
        int8x16_t xl = vld1q_s8(x + 32 * g), xh = vld1q_s8(x + 32 * g + 16);
        const uint8_t *qg = q + 16 * (size_t)g;
        int32x4_t isum = mmoe_reduce4(dot_group(qg, xl, xh), dot_group(qg + rowb, xl, xh),
                                      dot_group(qg + 2 * rowb, xl, xh), dot_group(qg + 3 * rowb, xl, xh));
        acc = mmoe_step4(acc, isum, mmoe_scales4(d + g, G));
    }
    return acc;
}

/* Decode: nibbles stay unsigned (w' = q + 8 in [0, 15]; 4 products per int16 lane stay within 4 * 15 * 127 = 7620)
 * and the offset is removed once per group for 4 rows: isum = sum(w' x) - 8 sum(x). */

MMOE_INLINE int32x4_t dot_group_u(const uint8_t *q, int8x16_t xl, int8x16_t xh) {
    uint8x16_t v = vld1q_u8(q);
    int8x16_t wl = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), wh = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    int16x8_t p = vmull_s8(vget_low_s8(wl), vget_low_s8(xl));
    p = vmlal_high_s8(p, wl, xl);
    p = vmlal_s8(p, vget_low_s8(wh), vget_low_s8(xh));
    p = vmlal_high_s8(p, wh, xh);
    return vpaddlq_s16(p);
}

static void gemv_rows4(const mmoe_q4_matrix *W, const int8_t *x, const int32_t *xoff, int g0, int g1, float *y,
                       int r) {
    const int G = W->cols / 32;
    const size_t rowb = (size_t)W->cols / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float32x4_t acc = g0 == 0 ? vdupq_n_f32(0.0f) : vld1q_f32(y); /* partial sums wait in y between chunks */
    for (int g = g0; g < g1; g++) {
        int8x16_t xl = vld1q_s8(x + 32 * g), xh = vld1q_s8(x + 32 * g + 16);
        const uint8_t *qg = q + 16 * (size_t)g;
        uintptr_t nx = (uintptr_t)qg + 4 * rowb; /* next 4-row block, as in kernels_dotprod.c */
        __asm__ volatile("prfm pldl1keep, [%0]\n\t"
                         "prfm pldl1keep, [%1]\n\t"
                         "prfm pldl1keep, [%2]\n\t"
                         "prfm pldl1keep, [%3]"
                         :
                         : "r"(nx), "r"(nx + rowb), "r"(nx + 2 * rowb), "r"(nx + 3 * rowb));
        int32x4_t isum = mmoe_reduce4(dot_group_u(qg, xl, xh), dot_group_u(qg + rowb, xl, xh),
                                      dot_group_u(qg + 2 * rowb, xl, xh), dot_group_u(qg + 3 * rowb, xl, xh));
        isum = vsubq_s32(isum, vdupq_n_s32(xoff[g - g0]));
        acc = mmoe_step4(acc, isum, mmoe_scales4(d + g, G));
    }
    vst1q_f32(y, acc);
}

static void gemv_neon(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    mmoe_gemv_arm(W, xq, xs, y, r0, r1, gemv_rows4);
}

static void gemm_neon(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy, int r0,
                      int r1) {
    const int rend = r0 + (r1 - r0) / 4 * 4;
    /* row blocks outer: a 4-row block (2*K bytes) stays in L1 while every token passes over it */
    for (int r = r0; r < rend; r += 4)
        for (int m = 0; m < M; m++)
            vst1q_f32(Y + (size_t)m * (size_t)ldy + (size_t)(r - r0),
                      vmulq_n_f32(rows4(W, r, Xq + (size_t)m * (size_t)W->cols), xs[m]));
    if (rend < r1)
        for (int m = 0; m < M; m++)
            mmoe_gemv_scalar(W, Xq + (size_t)m * (size_t)W->cols, xs[m], Y + (size_t)m * (size_t)ldy + (rend - r0),
                             rend, r1);
}

static const mmoe_kernel_set neon_set = {"neon", gemv_neon, gemm_neon, mmoe_quantize_row_q8};

const mmoe_kernel_set *mmoe_kernels_neon_set(void) { return &neon_set; }

#else
typedef int mmoe_kernels_neon_unused; /* not an aarch64 build: this file is empty */
#endif
