/* The scalar reference kernels: the arithmetic of kernels.h written out plainly. Every SIMD set is tested
 * for bit-exact equality with these, and these with an independent unpack-then-multiply reference. */
#include <math.h>

#include "kernels_internal.h"

/* The rule of model/quant.py quantize_act_int8 (stated in its docstring and in kernels.h), in IEEE fp32 with the
 * default environment (round to nearest even, no flush-to-zero):
 *   amax = max |x_i|, NaN skipped;  s = clamp(amax / 127, FLT_MIN, FLT_MAX);
 *   q_i = clamp(round_half_even(x_i / s), -127, 127), NaN -> 0.
 * The scale is always a normal finite number: a zero row gets FLT_MIN (q = 0), a row holding an inf FLT_MAX. */
float mmoe_quantize_row_q8(const float *x, int8_t *q, int K) {
    float amax = 0.0f;
    for (int i = 0; i < K; i++) {
        float a = fabsf(x[i]);
        if (a > amax) amax = a; /* false for NaN: skipped */
    }
    float s = mmoe_act_scale(amax);
    for (int i = 0; i < K; i++) q[i] = mmoe_act_code(x[i], s);
    return s;
}

/* sum over one 32-group of xq[i] * w[i], with w unpacked from 16 bytes of nibbles (byte i: w[i] low, w[i+16] high) */
static int32_t group_dot(const uint8_t *qs, const int8_t *xq) {
    int32_t s = 0;
    for (int i = 0; i < 16; i++) {
        s += (int32_t)xq[i] * ((int32_t)(qs[i] & 0x0f) - 8);
        s += (int32_t)xq[i + 16] * ((int32_t)(qs[i] >> 4) - 8);
    }
    return s;
}

static float row_dot(const mmoe_q4_matrix *W, int r, const int8_t *xq) {
    int G = W->cols / 32;
    const uint8_t *qs = W->qs + (size_t)r * (size_t)(W->cols / 2);
    const mmoe_fp16 *d = W->d + (size_t)r * (size_t)G;
    float acc = 0.0f;
    for (int g = 0; g < G; g++) {
        float p = (float)group_dot(qs + 16 * g, xq + 32 * g) * mmoe_fp16_to_f32(d[g]);
        acc = acc + p;
    }
    return acc;
}

void mmoe_gemv_scalar(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1) {
    for (int r = r0; r < r1; r++) y[r - r0] = row_dot(W, r, xq) * xs;
}

void mmoe_gemm_scalar(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy,
                      int r0, int r1) {
    /* rows outer so one weight row is reused from L1 by every token */
    for (int r = r0; r < r1; r++)
        for (int m = 0; m < M; m++)
            Y[(size_t)m * (size_t)ldy + (size_t)(r - r0)] = row_dot(W, r, Xq + (size_t)m * (size_t)W->cols) * xs[m];
}

static const mmoe_kernel_set scalar_set = {"scalar", mmoe_gemv_scalar, mmoe_gemm_scalar, mmoe_quantize_row_q8};

const mmoe_kernel_set *mmoe_kernels_scalar(void) { return &scalar_set; }
