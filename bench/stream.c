/* STREAM-style triad a[i] = b[i] + s * c[i] over arrays far larger than the last-level cache.
 *
 *   cc -O3 -march=native -fopenmp bench/stream.c -o stream && ./stream [threads] [mib_per_array] [repeats]
 *
 * Prints one JSON line: {"threads":T,"array_mib":M,"best_gbs":...,"median_gbs":...,"repeats":R}.
 * Bytes per pass = 3 arrays x 8 bytes x N (STREAM's convention: the write-allocate read of a[] is not
 * counted). Each thread first-touches its own slice so pages land near the core that streams them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    long mib = argc > 2 ? atol(argv[2]) : 256;
    int repeats = argc > 3 ? atoi(argv[3]) : 20;
    if (threads < 1 || mib < 8 || repeats < 2) {
        fprintf(stderr, "error: usage: stream [threads>=1] [mib_per_array>=8] [repeats>=2]\n");
        return 2;
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    if (threads != 1) {
        fprintf(stderr, "error: built without OpenMP, only 1 thread is available\n");
        return 2;
    }
#endif
    long n = mib * 1024L * 1024L / (long)sizeof(double);
    double *a = NULL, *b = NULL, *c = NULL;
    if (posix_memalign((void **)&a, 64, n * sizeof(double)) || posix_memalign((void **)&b, 64, n * sizeof(double)) ||
        posix_memalign((void **)&c, 64, n * sizeof(double))) {
        fprintf(stderr, "error: cannot allocate 3 x %ld MiB\n", mib);
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        a[i] = 0.0;
        b[i] = 1.0;
        c[i] = 2.0;
    }
    const double s = 3.0;
    double *gbs = malloc(sizeof(double) * (size_t)repeats);
    for (int r = 0; r < repeats; r++) {
        double t0 = now_s();
#pragma omp parallel for schedule(static)
        for (long i = 0; i < n; i++) a[i] = b[i] + s * c[i];
        double dt = now_s() - t0;
        gbs[r] = 3.0 * 8.0 * (double)n / dt / 1e9;
    }
    /* the result must be used, or the compiler may drop the loop */
    double check = 0.0;
    for (long i = 0; i < n; i += 4096) check += a[i];
    if (check != 7.0 * (double)((n + 4095) / 4096)) {
        fprintf(stderr, "error: triad check failed (%g)\n", check);
        return 1;
    }
    qsort(gbs, (size_t)repeats, sizeof(double), cmp_double);
    /* the first pass may pay page-table costs; best and median of all passes are reported */
    printf("{\"threads\": %d, \"array_mib\": %ld, \"best_gbs\": %.3f, \"median_gbs\": %.3f, \"repeats\": %d}\n",
           threads, mib, gbs[repeats - 1], gbs[repeats / 2], repeats);
    free(gbs);
    free(a);
    free(b);
    free(c);
    return 0;
}
