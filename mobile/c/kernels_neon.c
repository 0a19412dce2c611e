/* aarch64 baseline NEON (ARMv8.0, e.g. Cortex-A53): int8 x int8 products with vmull/vmlal into int16
 * (four products per lane, |.| <= 4 * 8 * 127 = 4064, no overflow), widened pairwise to int32.
 * Four rows share one fp32 vector accumulator, lane = row, so each lane follows the scalar sequence exactly. */
#include "kernels_internal.h"

#if defined(MMOE_ARM64)
#include "kernels_arm.h"

static inline int32x4_t dot_group(const uint8_t *q, int8x16_t xl, int8x16_t xh) {
    int8x16_t wl, wh;
    mmoe_unpack_q4(q, &wl, &wh);
    int16x8_t p = vmull_s8(vget_low_s8(wl), vget_low_s8(xl));
    p = vmlal_high_s8(p, wl, xl);
    p = vmlal_s8(p, vget_low_s8(wh), vget_low_s8(xh));
    p = vmlal_high_s8(p, wh, xh);
    return vpaddlq_s16(p);
}

/* 4 rows starting at row r, one token: writes acc (unscaled by xs) */
static inline float32x4_t rows4(const mmoe_q4_matrix *W, int r, const int8_t *x) {
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

static void gemv_neon(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    const int rend = r0 + (r1 - r0) / 4 * 4;
    for (int r = r0; r < rend; r += 4) vst1q_f32(y + (r - r0), vmulq_n_f32(rows4(W, r, xq), xs));
    if (rend < r1) mmoe_gemv_scalar(W, xq, xs, y + (rend - r0), rend, r1);
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

static const mmoe_kernel_set neon_set = {"neon", gemv_neon, gemm_neon};

const mmoe_kernel_set *mmoe_kernels_neon_set(void) { return &neon_set; }

#else
typedef int mmoe_kernels_neon_unused; /* not an aarch64 build: this file is empty */
#endif
