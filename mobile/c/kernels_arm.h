/* Helpers shared by the aarch64 kernel files (each includes it under its own -march flags). */
#ifndef MMOE_KERNELS_ARM_H
#define MMOE_KERNELS_ARM_H

#include <arm_neon.h>

#include "kernels_internal.h"

/* 16 bytes of nibbles -> signed weights: lo = elements 0..15, hi = elements 16..31 of the group */
MMOE_INLINE void mmoe_unpack_q4(const uint8_t *p, int8x16_t *lo, int8x16_t *hi) {
    uint8x16_t v = vld1q_u8(p);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), vdupq_n_s8(8));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
}

/* 4 rows' partial-sum vectors -> one vector of the 4 row totals */
MMOE_INLINE int32x4_t mmoe_reduce4(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
    return vpaddq_s32(vpaddq_s32(a, b), vpaddq_s32(c, d));
}

/* fp16 scales of 4 consecutive rows (row stride G) at one group, as fp32 (exact widening) */
MMOE_INLINE float32x4_t mmoe_scales4(const mmoe_fp16 *d, int G) {
    uint16x4_t h = vdup_n_u16(0);
    h = vld1_lane_u16(d, h, 0);
    h = vld1_lane_u16(d + (size_t)G, h, 1);
    h = vld1_lane_u16(d + 2 * (size_t)G, h, 2);
    h = vld1_lane_u16(d + 3 * (size_t)G, h, 3);
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

/* acc + isum * scale in every lane, as two separate roundings (no FMA: -ffp-contract=off, no vfma/vmla) */
MMOE_INLINE float32x4_t mmoe_step4(float32x4_t acc, int32x4_t isum, float32x4_t sc) {
    return vaddq_f32(acc, vmulq_f32(vcvtq_f32_s32(isum), sc));
}

/* Decode driver shared by the NEON and dotprod gemvs: 4-row blocks through rows4, which keeps the nibbles
 * unsigned and subtracts xoff[g - g0] = 8 * sum(x of group g) once per group for 4 rows. Groups go in chunks of
 * MMOE_XOFF_CHUNK; between chunks the running fp32 sums wait in y (a store/load is exact). */
#define MMOE_XOFF_CHUNK 256
typedef void (*mmoe_rows4_fn)(const mmoe_q4_matrix *W, const int8_t *x, const int32_t *xoff, int g0, int g1,
                              float *y, int r);

MMOE_INLINE void mmoe_gemv_arm(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1,
                               mmoe_rows4_fn rows4) {
    const int G = W->cols / 32;
    const int rend = r0 + (r1 - r0) / 4 * 4;
    if (G == 0) {
        mmoe_gemv_scalar(W, xq, xs, y, r0, r1);
        return;
    }
    for (int c0 = 0; c0 < G; c0 += MMOE_XOFF_CHUNK) {
        const int c1 = G - c0 < MMOE_XOFF_CHUNK ? G : c0 + MMOE_XOFF_CHUNK;
        int32_t xoff[MMOE_XOFF_CHUNK];
        for (int g = c0; g < c1; g++) {
            int16x8_t s = vpaddlq_s8(vld1q_s8(xq + 32 * g));
            s = vpadalq_s8(s, vld1q_s8(xq + 32 * g + 16));
            xoff[g - c0] = 8 * vaddlvq_s16(s);
        }
        for (int r = r0; r < rend; r += 4) rows4(W, xq, xoff, c0, c1, y + (r - r0), r);
    }
    for (int r = r0; r < rend; r += 4) vst1q_f32(y + (r - r0), vmulq_n_f32(vld1q_f32(y + (r - r0)), xs));
    if (rend < r1) mmoe_gemv_scalar(W, xq, xs, y + (rend - r0), rend, r1);
}

#endif
