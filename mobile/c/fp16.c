/* Exact IEEE half <-> single conversions in portable C (no F16C / __fp16 needed, so every build agrees).
 * fp16 -> fp32 is exact for every input; fp32 -> fp16 rounds to nearest, ties to even, like torch's .half():
 * overflow (|x| >= 65520) gives +-inf, results below the fp16 normal range become fp16 subnormals. */
#include <string.h>

#include "kernels.h"

static float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float mmoe_fp16_to_f32(mmoe_fp16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in fp32 (it is a normal fp32 number) */
        float v = (float)mant * 0x1p-24f;
        return bits_to_f32(f32_to_bits(v) | sign);
    }
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13)); /* inf / NaN (payload kept) */
    return bits_to_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

mmoe_fp16 mmoe_f32_to_fp16(float f) {
    uint32_t u = f32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        /* NaN: quieted, sign and top payload bits kept (x86 F16C, ARM FCVT and torch .half() all do this) */
        return (mmoe_fp16)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    }
    if (a >= 0x477ff000u) return (mmoe_fp16)(sign | 0x7c00u); /* >= 65520 rounds to inf; inf stays inf */
    if (a < 0x38800000u) {
        /* below 2^-14: an fp16 subnormal (or zero). result = round_half_even(|x| * 2^24) */
        uint32_t e = a >> 23;
        if (e < 102) return (mmoe_fp16)sign; /* |x| < 2^-25: rounds to zero (2^-25 exactly is e = 102) */
        uint32_t m = (a & 0x7fffffu) | 0x800000u;  /* |x| = m * 2^(e - 150) */
        uint32_t shift = 126 - e;                   /* |x| * 2^24 = m >> shift, 14 <= shift <= 24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (mmoe_fp16)(sign | q); /* q == 0x400 is correctly the smallest normal */
    }
    uint32_t q = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q++; /* a carry into the exponent is correct */
    return (mmoe_fp16)(sign | q);
}
