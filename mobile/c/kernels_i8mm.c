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
MMOE_INLINE int8x16_t lo64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
MMOE_INLINE int8x16_t hi64(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

/* integer sums of one group for a pair of tokens (a: their 4 chunks of 8 elements) and a pair of rows (b):
 * lanes [tok0.row0, tok0.row1, tok1.row0, tok1.row1] */
MMOE_INLINE int32x4_t mm_group(int8x16_t a0, int8x16_t a1, int8x16_t a2, int8x16_t a3, int8x16_t b0,
                                 int8x16_t b1, int8x16_t b2, int8x16_t b3) {
    int32x4_t t = vmmlaq_s32(vdupq_n_s32(0), a0, b0);
    t = vmmlaq_s32(t, a1, b1);
    t = vmmlaq_s32(t, a2, b2);
    return vmmlaq_s32(t, a3, b3);
}

MMOE_INLINE float32x4_t pair_scales(const mmoe_fp16 *d, int G) { /* [d_r0, d_r1, d_r0, d_r1] */
    uint16x4_t h = vdup_n_u16(0);
    h = vld1_lane_u16(d, h, 0);
    h = vld1_lane_u16(d + (size_t)G, h, 1);
    h = vld1_lane_u16(d, h, 2);
    h = vld1_lane_u16(d + (size_t)G, h, 3);
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

MMOE_INLINE void store_pair(float *Y, int ldy, float32x4_t acc, float xs0, float xs1) {
    float32x4_t v = vmulq_f32(acc, vcombine_f32(vdup_n_f32(xs0), vdup_n_f32(xs1)));
    vst1_f32(Y, vget_low_f32(v));
    vst1_f32(Y + ldy, vget_high_f32(v));
}

/* 4 tokens x 4 rows, written out (no arrays: at -O2 GCC would keep loops and round-trip them through the stack).
 * accTR: token pair T (tokens 2T, 2T+1) x row pair R (rows 2R, 2R+1). Elements 0..7, 8..15 of a group come from
 * the low nibbles, 16..23, 24..31 from the high ones; lo64/hi64 put two rows' (or tokens') 8 elements side by side. */
static void tile_4x4(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo, float *Y,
                     int ldy) {
    (void)xo; /* NULL: sdot/smmla take the signed nibble directly */
    const int K = W->cols, G = K / 32;
    const size_t rowb = (size_t)K / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float32x4_t acc00 = vdupq_n_f32(0.0f), acc01 = acc00, acc10 = acc00, acc11 = acc00;
    for (int g = 0; g < G; g++) {
        const uint8_t *qg = q + 16 * (size_t)g;
        int8x16_t l0, h0, l1, h1, l2, h2, l3, h3;
        mmoe_unpack_q4(qg, &l0, &h0);
        mmoe_unpack_q4(qg + rowb, &l1, &h1);
        mmoe_unpack_q4(qg + 2 * rowb, &l2, &h2);
        mmoe_unpack_q4(qg + 3 * rowb, &l3, &h3);
        const int8x16_t b00 = lo64(l0, l1), b01 = hi64(l0, l1), b02 = lo64(h0, h1), b03 = hi64(h0, h1);
        const int8x16_t b10 = lo64(l2, l3), b11 = hi64(l2, l3), b12 = lo64(h2, h3), b13 = hi64(h2, h3);
        const int8_t *x0 = X + 32 * (size_t)g, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        const int8x16_t x0l = vld1q_s8(x0), x0h = vld1q_s8(x0 + 16), x1l = vld1q_s8(x1), x1h = vld1q_s8(x1 + 16);
        const int8x16_t x2l = vld1q_s8(x2), x2h = vld1q_s8(x2 + 16), x3l = vld1q_s8(x3), x3h = vld1q_s8(x3 + 16);
        const int8x16_t a00 = lo64(x0l, x1l), a01 = hi64(x0l, x1l), a02 = lo64(x0h, x1h), a03 = hi64(x0h, x1h);
        const int8x16_t a10 = lo64(x2l, x3l), a11 = hi64(x2l, x3l), a12 = lo64(x2h, x3h), a13 = hi64(x2h, x3h);
        const float32x4_t sc0 = pair_scales(d + g, G), sc1 = pair_scales(d + 2 * (size_t)G + g, G);
        acc00 = mmoe_step4(acc00, mm_group(a00, a01, a02, a03, b00, b01, b02, b03), sc0);
        acc01 = mmoe_step4(acc01, mm_group(a00, a01, a02, a03, b10, b11, b12, b13), sc1);
        acc10 = mmoe_step4(acc10, mm_group(a10, a11, a12, a13, b00, b01, b02, b03), sc0);
        acc11 = mmoe_step4(acc11, mm_group(a10, a11, a12, a13, b10, b11, b12, b13), sc1);
    }
    store_pair(Y, ldy, acc00, xs[0], xs[1]);
    store_pair(Y + 2, ldy, acc01, xs[0], xs[1]);
    store_pair(Y + 2 * (size_t)ldy, ldy, acc10, xs[2], xs[3]);
    store_pair(Y + 2 * (size_t)ldy + 2, ldy, acc11, xs[2], xs[3]);
}

static void gemm_i8mm(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy, int r0,
                      int r1) {
    mmoe_gemm_tiled(W, Xq, xs, M, Y, ldy, r0, r1, tile_4x4, mmoe_gemv_dotprod, 0);
}

static const mmoe_kernel_set i8mm_set = {"i8mm", mmoe_gemv_dotprod, gemm_i8mm, mmoe_quantize_row_q8};

const mmoe_kernel_set *mmoe_kernels_i8mm_set(void) { return &i8mm_set; }

#else
typedef int mmoe_kernels_i8mm_unused; /* not an aarch64 build: this file is empty */
#endif
