/* Private to the kernel files: how cpu_features.c reaches each compiled-in kernel set, and the scalar pieces
 * the SIMD sets reuse for their tails (rows or tokens that do not fill a SIMD tile). Not part of the engine API. */
#ifndef MMOE_KERNELS_INTERNAL_H
#define MMOE_KERNELS_INTERNAL_H

#include "kernels.h"

void mmoe_gemv_scalar(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1);
void mmoe_gemm_scalar(const mmoe_q4_matrix *W, const int8_t *Xq, const float *xs, int M, float *Y, int ldy,
                      int r0, int r1);

#if defined(__x86_64__) || defined(_M_X64)
#define MMOE_X86 1
const mmoe_kernel_set *mmoe_kernels_avx2_set(void);
#endif

#if defined(__aarch64__)
#define MMOE_ARM64 1
const mmoe_kernel_set *mmoe_kernels_neon_set(void);
const mmoe_kernel_set *mmoe_kernels_dotprod_set(void);
const mmoe_kernel_set *mmoe_kernels_i8mm_set(void);
/* the dotprod gemv, also the i8mm set's decode kernel (compiled with +dotprod in kernels_dotprod.c) */
void mmoe_gemv_dotprod(const mmoe_q4_matrix *W, const int8_t *xq, float xs, float *y, int r0, int r1);
#endif

#endif
