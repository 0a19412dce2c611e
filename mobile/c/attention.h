/* Attention over the fp16 KV cache and the router's fp32 dot product (attention.c): one fixed arithmetic order,
 * reproduced exactly by the scalar reference and the SIMD versions (AVX2+F16C on x86, NEON on aarch64). */
#ifndef MMOE_ATTENTION_H
#define MMOE_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

enum { MMOE_ATT_SCALAR = 0, MMOE_ATT_SIMD = 1 };

/* MMOE_ATT_SIMD when this CPU/build has it, else MMOE_ATT_SCALAR. */
int mmoe_att_best_impl(void);

/* sum a[i] * b[i] in the canonical 8-lane order (see attention.c) */
float mmoe_dot_f32(const float *a, const float *b, int n, int impl);

/* sum a[i] * fp32(b[i]) over IEEE-half b, in the same canonical order: each b[i] is converted exactly, so the
 * result is mmoe_dot_f32 of a and the converted b, bit for bit (the fp16 router's logits) */
float mmoe_dot_f16(const float *a, const uint16_t *b, int n, int impl);

/* One query head against keys/values s = 0 .. n_keys-1 at kc + s * stride, vc + s * stride (fp16, hd each):
 * softmax(q . K[s] * scale) weighted sum of V[s] into o[hd]; sc is scratch of n_keys floats. */
void mmoe_att_head(const float *q, const uint16_t *kc, const uint16_t *vc, size_t stride, int n_keys, int hd,
                   float scale, float *sc, float *o, int impl);

/* ng consecutive query heads sharing one KV head (GQA): exactly mmoe_att_head on each; sc holds ng * n_keys. */
void mmoe_att_group(const float *q, int ng, const uint16_t *kc, const uint16_t *vc, size_t stride, int n_keys,
                    int hd, float scale, float *sc, float *o, int impl);

/* Rows (query token, head) of one KV head that mmoe_att_block computes together, sharing each K/V conversion. */
enum { MMOE_ATT_TILE = 8 };

/* Prefill: nq consecutive query tokens (q_stride floats apart in q, o_stride in o), each with ng heads (hd apart)
 * of one KV head; query b sees keys 0 .. n_keys0 + b - 1 (causal). Exactly mmoe_att_group(q + b * q_stride, ng,
 * kc, vc, stride, n_keys0 + b, hd, scale, ., o + b * o_stride, impl) for every b, bit for bit; sc is scratch of
 * MMOE_ATT_TILE * (n_keys0 + nq - 1) floats. */
void mmoe_att_block(const float *q, size_t q_stride, int nq, int ng, const uint16_t *kc, const uint16_t *vc,
                    size_t stride, int n_keys0, int hd, float scale, float *sc, float *o, size_t o_stride, int impl);

#endif
