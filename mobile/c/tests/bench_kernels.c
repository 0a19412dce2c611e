/* Kernel microbenchmark (single thread): for every kernel set usable on this CPU,
 *   gemv (decode): GB/s of INT4 weights + fp16 scales streamed, on one matrix (cache-resident: 2.9 MB) and on a
 *                  ring of matrices larger than the last-level cache (memory-bound, what decode sees);
 *   gemm (prefill, M tokens): integer GOP/s (2 * M * rows * K per call).
 * Times are the best of repeated batches (>= 4 MB streamed each) in thread CPU time.
 * usage: bench_kernels [--rows R] [--cols K] [--ring MB] [-M tokens] [--min-time s]     (numbers only, no checks) */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../kernels.h"

/* thread CPU time, not wall time: on a shared, oversubscribed machine a preempted call would otherwise count the
 * time other processes ran (the dev boxes run at load 10+ on 2 cores) */
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t g_rng = 88172645463325252ull;
static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

/* sum of all 64-bit words: a plain streaming read, the roofline for a kernel that reads each weight byte once */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
__attribute__((target("avx2"))) static uint64_t read_all(const uint8_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t out[4];
    _mm256_storeu_si256((__m256i *)out, a);
    return out[0] + out[1] + out[2] + out[3];
}
#else
static uint64_t read_all(const uint8_t *p, size_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, w[4];
    for (size_t i = 0; i + 32 <= n; i += 32) {
        memcpy(w, p + i, 32);
        a0 += w[0];
        a1 += w[1];
        a2 += w[2];
        a3 += w[3];
    }
    return a0 + a1 + a2 + a3;
}
#endif

static mmoe_q4_matrix make(int rows, int K) {
    size_t nq = (size_t)rows * (size_t)K / 2, nd = (size_t)rows * (size_t)K / 32;
    uint8_t *qs = aligned_alloc(64, (nq + 63) / 64 * 64);
    mmoe_fp16 *d = aligned_alloc(64, (nd * 2 + 63) / 64 * 64);
    for (size_t i = 0; i < nq; i++) qs[i] = (uint8_t)rnd();
    for (size_t i = 0; i < nd; i++) d[i] = mmoe_f32_to_fp16((float)(rnd() % 1000 + 1) * 1e-5f);
    mmoe_q4_matrix W = {qs, d, rows, K};
    return W;
}

int main(int argc, char **argv) {
    int rows = 4096, K = 1280, M = 64;
    double ring_mb = 128, min_time = 0.3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rows")) rows = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cols")) K = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ring")) ring_mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "-M")) M = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-time")) min_time = atof(argv[i + 1]);
        else {
            fprintf(stderr, "bench_kernels: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (rows <= 0 || K <= 0 || K % 32 || M <= 0) {
        fprintf(stderr, "bench_kernels: need rows > 0, K a positive multiple of 32, M > 0\n");
        return 2;
    }
    double mbytes = (double)rows * K / 2 + (double)rows * K / 32 * 2;
    int nring = (int)(ring_mb * 1e6 / mbytes) + 1;
    mmoe_q4_matrix *ring = malloc(sizeof *ring * (size_t)nring);
    for (int i = 0; i < nring; i++) ring[i] = make(rows, K);
    int8_t *X = malloc((size_t)M * (size_t)K);
    float *xs = malloc(sizeof(float) * (size_t)M), *Y = malloc(sizeof(float) * (size_t)M * (size_t)rows);
    for (size_t i = 0; i < (size_t)M * (size_t)K; i++) X[i] = (int8_t)(rnd() % 255 - 127);
    for (int m = 0; m < M; m++) xs[m] = 0.01f;

    /* reference: plain summing read of the same ring (what the memory system gives one thread) */
    double best_read = 1e9;
    volatile uint64_t sink = 0;
    for (int rep = 0; rep < 3; rep++) {
        for (int i = 0; i < nring; i++) {
            size_t n = (size_t)rows * (size_t)K / 2;
            double t0 = now();
            uint64_t acc = read_all(ring[i].qs, n);
            double dt = now() - t0;
            sink += acc;
            best_read = dt < best_read ? dt : best_read;
        }
    }
    printf("plain read (AVX2 on x86) of one ring matrix's nibbles, from DRAM: %.1f GB/s\n",
           (double)rows * K / 2 / best_read / 1e9);
    printf("matrix %d x %d (%.2f MB with scales), ring of %d (%.0f MB), gemm M=%d, 1 thread\n", rows, K, mbytes / 1e6,
           nring, nring * mbytes / 1e6, M);
    printf("| set | gemv GB/s (cached) | gemv GB/s (ring, from DRAM) | gemm GOP/s (M=%d) |\n|---|---|---|---|\n", M);
    const char *const *names = mmoe_kernels_available();
    for (int s = 0; names[s]; s++) {
        const mmoe_kernel_set *k = mmoe_kernels_by_name(names[s]);
        /* time batches of calls that stream >= 4 MB each: one small call can be shorter than the resolution of
         * the thread CPU clock on a VM */
        const int batch = (int)(4e6 / mbytes) + 1;
        double best_c = 1e9, best_r = 1e9, best_m = 1e9;
        double t_end = now() + min_time;
        do { /* cached: the same matrix again and again */
            double t0 = now();
            for (int b = 0; b < batch; b++) k->gemv(&ring[0], X, xs[0], Y, 0, rows);
            double dt = (now() - t0) / batch;
            best_c = dt < best_c ? dt : best_c;
        } while (now() < t_end);
        t_end = now() + min_time;
        int i = 0;
        do { /* ring: every call reads a matrix evicted from the caches since its last use */
            double t0 = now();
            for (int b = 0; b < batch; b++, i = (i + 1) % nring) k->gemv(&ring[i], X, xs[0], Y, 0, rows);
            double dt = (now() - t0) / batch;
            best_r = dt < best_r ? dt : best_r;
        } while (now() < t_end);
        t_end = now() + min_time;
        int reps = 0;
        do {
            double t0 = now();
            k->gemm(&ring[0], X, xs, M, Y, rows, 0, rows);
            double dt = now() - t0;
            best_m = dt < best_m ? dt : best_m;
            reps++;
        } while (now() < t_end || reps < 2);
        printf("| %s | %.1f | %.1f | %.1f |\n", k->name, mbytes / best_c / 1e9, mbytes / best_r / 1e9,
               2.0 * M * rows * (double)K / best_m / 1e9);
        fflush(stdout);
    }
    return 0;
}
