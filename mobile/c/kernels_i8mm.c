/* aarch64 int8 matrix multiply (ARMv8.6 i8mm, e.g. Cortex-A510/A710/X2 and later) for prefill: vmmlaq_s32
 * multiplies a 2x8 int8 block of two tokens by the transpose of a 2x8 block of two weight rows, accumulating a
 * 2x2 int32 tile: 32 products per instruction. A 4-token x 4-row tile per step; decode (gemv) is the dotprod
 * kernel (every i8mm CPU has dotprod; the set is only handed out when both hwcaps are present). */
#include "kernels_internal.h"

#if defined(MMOE_ARM64)
#if !defined(__ARM_FEATURE_MATMUL_INT8) || !defined(__ARM_FEATURE_DOTPROD)
#error "kernels_i8mm.c needs -march=armv8.2-a+dotprod+i8mm (MMOE_KFLAGS in kernels.mk)"
#endif
#include "kernels_arm.h"

/* rows of 8 bytes: [a0..a7 | b0..b7] from the low or high halves of two 16-byte vectors */
static inline int8x16_t lo64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
static inline int8x16_t hi64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

/* integer sums of one group for a pair of tokens (x, y) and a pair of rows (chunks of 8 elements in b[0..3]):
 * lanes [x.r0, x.r1, y.r0, y.r1] */
static inline int32x4_t mm_group(const int8x16_t a[4], const int8x16_t b[4]) {
    int32x4_t t = vmmlaq_s32(vdupq_n_s32(0), a[0], b[0]);
    t = vmmlaq_s32(t, a[1], b[1]);
    t = vmmlaq_s32(t, a[2], b[2]);
    return vmmlaq_s32(t, a[3], b[3]);
}

static inline void pair_chunks(int8x16_t lo_a, int8x16_t hi_a, int8x16_t lo_b, int8x16_t hi_b, int8x16_t c[4]) {
    c[0] = lo64(lo_a, lo_b); /* elements 0..7 of a, then of b */
    c[1] = hi64(lo_a, lo_b); /* 8..15 */
    c[2] = lo64(hi_a, hi_b); /* 16..23 */
    c[3] = hi64(hi_a, hi_b); /* 24..31 */
}

static inline float32x4_t pair_scales(const mmoe_fp16 *d, int G) { /* [d_r0, d_r1, d_r0, d_r1] */
    uint16x4_t h = vdup_n_u16(0);
    h = vld1_lane_u16(d, h, 0);
    h = vld1_lane_u16(d + (size_t)G, h, 1);
    h = vld1_lane_u16(d, h, 2);
    h = vld1_lane_u16(d + (size_t)G, h, 3);
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

/* 4 tokens x 4 rows; acc[tp][rp] lanes [tok 2tp row 2rp, tok 2tp row 2rp+1, tok 2tp+1 row 2rp, ...+1] */
static void tile_4x4(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, float *Y, int ldy) {
    const int K = W->cols, G = K / 32;
    const size_t rowb = (size_t)K / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float32x4_t acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) acc[i][j] = vdupq_n_f32(0.0f);
    for (int g = 0; g < G; g++) {
        const uint8_t *qg = q + 16 * (size_t)g;
        int8x16_t wl[4], wh[4], b[2][4], a[2][4];
        for (int i = 0; i < 4; i++) mmoe_unpack_q4(qg + (size_t)i * rowb, &wl[i], &wh[i]);
        pair_chunks(wl[0], wh[0], wl[1], wh[1], b[0]);
        pair_chunks(wl[2], wh[2], wl[3], wh[3], b[1]);
        for (int tp = 0; tp < 2; tp++) {
            const int8_t *x0 = X + (size_t)(2 * tp) * (size_t)K + 32 * (size_t)g, *x1 = x0 + K;
            pair_chunks(vld1q_s8(x0), vld1q_s8(x0 + 16), vld1q_s8(x1), vld1q_s8(x1 + 16), a[tp]);
        }
        for (int rp = 0; rp < 2; rp++) {
            float32x4_t sc = pair_scales(d + (size_t)(2 * rp) * (size_t)G + g, G);
            for (int tp = 0; tp < 2; tp++) acc[tp][rp] = mmoe_step4(acc[tp][rp], mm_group(a[tp], b[rp]), sc);
        }
    }
    for (int tp = 0; tp < 2; tp++) {
        float32x4_t s = vcombine_f32(vdup_n_f32(xs[2 * tp]), vdup_n_f32(xs[2 * tp + 1]));
        for (int rp = 0; rp < 2; rp++) {
            float32x4_t v = vmulq_f32(acc[tp][rp], s);
            vst1_f32(Y + (size_t)(2 * tp) * (size_t)ldy + 2 * rp, vget_low_f32(v));
            vst1_f32(Y + (size_t)(2 * tp + 1) * (size_t)ldy + 2 * rp, vget_high_f32(v));
        }
    }
}

static void gemm_i8mm(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy, int r0,
                      int r1) {
    mmoe_gemm_tiled(W, Xq, xs, M, Y, ldy, r0, r1, tile_4x4, mmoe_gemv_dotprod);
}

static const mmoe_kernel_set i8mm_set = {"i8mm", mmoe_gemv_dotprod, gemm_i8mm};

const mmoe_kernel_set *mmoe_kernels_i8mm_set(void) { return &i8mm_set; }

#else
typedef int mmoe_kernels_i8mm_unused; /* not an aarch64 build: this file is empty */
#endif
