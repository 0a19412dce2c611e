/* Sampling: greedy (first maximum, as torch.argmax), or temperature + top-p (nucleus) with a seeded
 * xorshift64* generator, so a given seed reproduces the same text on every platform. */
#include <math.h>
#include <stdlib.h>

#include "internal.h"

uint64_t mmoe_rng_seed(uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 0x2545F4914F6CDD1DULL;
    return s ? s : 1;
}

static double rng_uniform(uint64_t *s) { /* [0, 1) */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (double)((*s * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

typedef struct {
    float p;
    int32_t id;
} prob;

static int by_prob_desc(const void *a, const void *b) {
    const prob *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id < y->id ? -1 : x->id > y->id;
}

int32_t mmoe_sample(const float *logits, int n, float temperature, float top_p, uint64_t *rng) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0.0f) || n <= 1) return best;
    prob *p = malloc((size_t)n * sizeof *p);
    if (!p) return best;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        p[i].p = expf((logits[i] - logits[best]) / temperature);
        p[i].id = i;
        sum += p[i].p;
    }
    int m = n;
    if (top_p > 0.0f && top_p < 1.0f) { /* keep the smallest prefix whose mass reaches top_p */
        qsort(p, (size_t)n, sizeof *p, by_prob_desc);
        double cum = 0.0;
        for (m = 0; m < n;) {
            cum += p[m].p / sum;
            m++;
            if (cum >= top_p) break;
        }
        sum = 0.0;
        for (int i = 0; i < m; i++) sum += p[i].p;
    }
    double r = rng_uniform(rng) * sum, acc = 0.0;
    int32_t out = p[m - 1].id;
    for (int i = 0; i < m; i++) {
        acc += p[i].p;
        if (r < acc) {
            out = p[i].id;
            break;
        }
    }
    free(p);
    return out;
}
