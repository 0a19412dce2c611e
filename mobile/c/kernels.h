/* INT4-weight x INT8-activation matmul kernels: the contract between the engine and every SIMD build.
 *
 * Weight format (model/quant.py, bit-exact with QAT): a rows x K matrix, K % 32 == 0, symmetric INT4 in groups of
 * 32 along K with one fp16 scale per group.  qs: rows * K/2 bytes, row-major; within each 32-group, byte i (0..15)
 * holds (q[i] + 8) in the low nibble and (q[i + 16] + 8) in the high nibble.  d: rows * K/32 fp16 scales.
 * Activations: int8 per token, q = clamp(round_half_even(x / s), -127, 127) (NaN x -> 0), s = amax|x| / 127 with NaN
 * skipped, clamped to [FLT_MIN, FLT_MAX] (a zero row gets FLT_MIN); weight scales are normal fp16 in [2^-14, 65504].
 *
 * Arithmetic every kernel must reproduce EXACTLY (so SIMD == scalar bit for bit; build with -ffp-contract=off):
 *   isum[r][g] = sum_{i in group g} xq[i] * wq[r][i]              (exact int32)
 *   acc = 0.0f; for g = 0 .. K/32-1 in order: acc = acc + (float)isum[r][g] * fp16_to_f32(d[r][g]);
 *   y[r] = acc * xs;
 * A gemm over M tokens gives, for each (m, r), the same value as the gemv on token m.
 */
#ifndef MMOE_KERNELS_H
#define MMOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef uint16_t mmoe_fp16;

typedef struct {
    const uint8_t *qs;     /* rows * cols / 2 bytes */
    const mmoe_fp16 *d;    /* rows * cols / 32 scales */
    int rows;
    int cols;              /* K, a multiple of 32 */
} mmoe_q4_matrix;

float mmoe_fp16_to_f32(mmoe_fp16 h);
mmoe_fp16 mmoe_f32_to_fp16(float f); /* round to nearest even, as torch's .half() */

/* Quantize one row of K floats to int8 (model/quant.py quantize_act_int8); returns the fp32 scale. */
float mmoe_quantize_row_q8(const float *x, int8_t *q, int K);

/* y[r - r0] for rows r in [r0, r1) */
typedef void (*mmoe_gemv_fn)(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1);
/* Y[m * ldy + (r - r0)] for m in [0, M), r in [r0, r1); Xq is M x K row-major, xs has M scales */
typedef void (*mmoe_gemm_fn)(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M,
                             float *Y, int ldy, int r0, int r1);

/* mmoe_quantize_row_q8's exact results (the scalar one, or a SIMD twin that gives the same bytes and scale) */
typedef float (*mmoe_quant_fn)(const float *x, int8_t *q, int K);

typedef struct {
    const char *name;      /* "scalar", "avx2", "avx512vnni", "neon", "dotprod", "i8mm" */
    mmoe_gemv_fn gemv;
    mmoe_gemm_fn gemm;
    mmoe_quant_fn quantize;
} mmoe_kernel_set;

const mmoe_kernel_set *mmoe_kernels_scalar(void);
/* NULL when that set is not compiled in or the CPU lacks the feature (runtime detection). */
const mmoe_kernel_set *mmoe_kernels_by_name(const char *name);
/* Best available at runtime; the environment variable MMOE_KERNELS=<name> forces one (error if unavailable). */
const mmoe_kernel_set *mmoe_kernels_best(void);
/* Names of the sets usable on this CPU, best last, NULL-terminated. */
const char *const *mmoe_kernels_available(void);

#endif
