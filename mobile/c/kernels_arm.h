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

#endif
