/* aarch64 NEON with the dot-product extension (ARMv8.2+ dotprod, e.g. Cortex-A55/A76 and later): vdotq_s32
 * does 16 int8 x int8 products into 4 int32 lanes per instruction. Built with +dotprod for this file only and
 * handed out only when AT_HWCAP has HWCAP_ASIMDDP. Lane = row in the fp32 accumulators, as in the other sets. */
#include "kernels_internal.h"

#if defined(MMOE_ARM64)
#if !defined(__ARM_FEATURE_DOTPROD)
#error "kernels_dotprod.c needs -march=armv8.2-a+dotprod (MMOE_KFLAGS in kernels.mk)"
#endif
#include "kernels_arm.h"

MMOE_INLINE int32x4_t dot_group(int8x16_t wl, int8x16_t wh, int8x16_t xl, int8x16_t xh) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), wl, xl), wh, xh);
}

/* Decode keeps the weight nibbles unsigned (w' = q + 8 in [0, 15], valid int8 for sdot) and removes the offset
 * once per group for 4 rows: isum = sum(w' x) - 8 sum(x). Saves the two subtractions per row and group. */

MMOE_INLINE void unpack_u4(const uint8_t *p, int8x16_t *lo, int8x16_t *hi) {
    uint8x16_t v = vld1q_u8(p);
    *lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
    *hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
}

static void gemv_dotprod_rows4(const mmoe_q4_matrix *W, const int8_t *x, const int32_t *xoff, int g0, int g1,
                               float *y, int r) {
    const int G = W->cols / 32;
    const size_t rowb = (size_t)W->cols / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    /* between chunks of groups the running fp32 sums wait in y (a store/load is exact) */
    float32x4_t acc = g0 == 0 ? vdupq_n_f32(0.0f) : vld1q_f32(y);
    for (int g = g0; g < g1; g++) {
        int8x16_t xl = vld1q_s8(x + 32 * g), xh = vld1q_s8(x + 32 * g + 16);
        const uint8_t *qg = q + 16 * (size_t)g;
        /* the same bytes of the next 4-row block: 4 short interleaved row streams train hardware prefetchers
         * poorly (the AVX2 twin of this doubled large-matrix bandwidth on x86; not measured on an ARM phone).
         * asm: never faults, may point past the matrix, and is not dropped by the optimiser. */
        uintptr_t nx = (uintptr_t)qg + 4 * rowb;
        __asm__ volatile("prfm pldl1keep, [%0]\n\t"
                         "prfm pldl1keep, [%1]\n\t"
                         "prfm pldl1keep, [%2]\n\t"
                         "prfm pldl1keep, [%3]"
                         :
                         : "r"(nx), "r"(nx + rowb), "r"(nx + 2 * rowb), "r"(nx + 3 * rowb));
        int8x16_t l0, h0, l1, h1, l2, h2, l3, h3;
        unpack_u4(qg, &l0, &h0);
        unpack_u4(qg + rowb, &l1, &h1);
        unpack_u4(qg + 2 * rowb, &l2, &h2);
        unpack_u4(qg + 3 * rowb, &l3, &h3);
        int32x4_t isum = mmoe_reduce4(dot_group(l0, h0, xl, xh), dot_group(l1, h1, xl, xh),
                                      dot_group(l2, h2, xl, xh), dot_group(l3, h3, xl, xh));
        isum = vsubq_s32(isum, vdupq_n_s32(xoff[g - g0]));
        acc = mmoe_step4(acc, isum, mmoe_scales4(d + g, G));
    }
    vst1q_f32(y, acc);
}

void mmoe_gemv_dotprod(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    mmoe_gemv_arm(W, xq, xs, y, r0, r1, gemv_dotprod_rows4);
}

/* one token against 4 unpacked weight rows (one group): [row0 .. row3] */
MMOE_INLINE int32x4_t tok4(int8x16_t l0, int8x16_t h0, int8x16_t l1, int8x16_t h1, int8x16_t l2, int8x16_t h2,
                             int8x16_t l3, int8x16_t h3, const int8_t *x) {
    int8x16_t xl = vld1q_s8(x), xh = vld1q_s8(x + 16);
    return mmoe_reduce4(dot_group(l0, h0, xl, xh), dot_group(l1, h1, xl, xh), dot_group(l2, h2, xl, xh),
                        dot_group(l3, h3, xl, xh));
}

/* 4 rows x 4 tokens: each unpacked weight group is used by four tokens (written out: no arrays / inner loops,
 * which GCC -O2 would keep and round-trip through the stack) */
static void tile_4x4(const mmoe_q4_matrix *W, int r, const int8_t *X, const float *xs, const int32_t *xo, float *Y,
                     int ldy) {
    (void)xo; /* NULL: sdot/smmla take the signed nibble directly */
    const int K = W->cols, G = K / 32;
    const size_t rowb = (size_t)K / 2;
    const uint8_t *q = W->qs + (size_t)r * rowb;
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int g = 0; g < G; g++) {
        const uint8_t *qg = q + 16 * (size_t)g;
        int8x16_t l0, h0, l1, h1, l2, h2, l3, h3;
        mmoe_unpack_q4(qg, &l0, &h0);
        mmoe_unpack_q4(qg + rowb, &l1, &h1);
        mmoe_unpack_q4(qg + 2 * rowb, &l2, &h2);
        mmoe_unpack_q4(qg + 3 * rowb, &l3, &h3);
        const float32x4_t sc = mmoe_scales4(d + g, G);
        const int8_t *x = X + 32 * (size_t)g;
        acc0 = mmoe_step4(acc0, tok4(l0, h0, l1, h1, l2, h2, l3, h3, x), sc);
        acc1 = mmoe_step4(acc1, tok4(l0, h0, l1, h1, l2, h2, l3, h3, x + K), sc);
        acc2 = mmoe_step4(acc2, tok4(l0, h0, l1, h1, l2, h2, l3, h3, x + 2 * (size_t)K), sc);
        acc3 = mmoe_step4(acc3, tok4(l0, h0, l1, h1, l2, h2, l3, h3, x + 3 * (size_t)K), sc);
    }
    vst1q_f32(Y, vmulq_n_f32(acc0, xs[0]));
    vst1q_f32(Y + ldy, vmulq_n_f32(acc1, xs[1]));
    vst1q_f32(Y + 2 * (size_t)ldy, vmulq_n_f32(acc2, xs[2]));
    vst1q_f32(Y + 3 * (size_t)ldy, vmulq_n_f32(acc3, xs[3]));
}

static void gemm_dotprod(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy, int r0,
                      int r1) {
    mmoe_gemm_tiled(W, Xq, xs, M, Y, ldy, r0, r1, tile_4x4, mmoe_gemv_dotprod, 0);
}

static const mmoe_kernel_set dotprod_set = {"dotprod", mmoe_gemv_dotprod, gemm_dotprod, mmoe_quantize_row_q8};

const mmoe_kernel_set *mmoe_kernels_dotprod_set(void) { return &dotprod_set; }

#else
typedef int mmoe_kernels_dotprod_unused; /* not an aarch64 build: this file is empty */
#endif
