/* Runtime CPU-feature detection and kernel-set selection.
 * x86-64: cpuid + xgetbv (the OS must save the YMM state, not only the CPU support AVX2).
 * aarch64: getauxval(AT_HWCAP / AT_HWCAP2); a kernel set built with +dotprod / +i8mm is only handed out when
 * the kernel reports the feature, so the same static binary runs on a Cortex-A53 (plain NEON) without SIGILL. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_internal.h"

#if defined(MMOE_X86)
#include <cpuid.h>
#endif
#if defined(MMOE_ARM64)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

#define MAX_SETS 8

static const mmoe_kernel_set *g_sets[MAX_SETS]; /* usable sets, best last */
static const char *g_names[MAX_SETS + 1];
static int g_nsets;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

#if defined(MMOE_X86)
static int x86_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1, fma = (c >> 12) & 1;
    if (!(osxsave && avx && f16c && fma)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    (void)xhi;
    if ((xlo & 6u) != 6u) return 0; /* XMM and YMM state enabled by the OS */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}
#endif

/* A build may restrict the sets it hands out: -DMMOE_KERNELS_ONLY="scalar,neon,dotprod" (make KERNELS=...).
 * scalar is always kept: it is the reference and the tail path of every SIMD set. */
static int allowed(const char *name) {
#ifdef MMOE_KERNELS_ONLY
    const char *list = MMOE_KERNELS_ONLY;
    size_t n = strlen(name);
    if (strcmp(name, "scalar") == 0) return 1;
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        p += len + (e ? 1 : 0);
    }
    return 0;
#else
    (void)name;
    return 1;
#endif
}

static void add_set(const mmoe_kernel_set *k) {
    if (k && g_nsets < MAX_SETS && allowed(k->name)) {
        g_sets[g_nsets] = k;
        g_names[g_nsets] = k->name;
        g_nsets++;
    }
}

static void detect(void) {
    add_set(mmoe_kernels_scalar());
#if defined(MMOE_X86)
    if (x86_has_avx2()) add_set(mmoe_kernels_avx2_set());
#endif
#if defined(MMOE_ARM64)
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (hw & HWCAP_ASIMD) {
        add_set(mmoe_kernels_neon_set());
        if (hw & HWCAP_ASIMDDP) {
            add_set(mmoe_kernels_dotprod_set());
            if (hw2 & HWCAP2_I8MM) add_set(mmoe_kernels_i8mm_set());
        }
    }
#endif
    g_names[g_nsets] = NULL;
}

const char *const *mmoe_kernels_available(void) {
    pthread_once(&g_once, detect);
    return g_names;
}

const mmoe_kernel_set *mmoe_kernels_by_name(const char *name) {
    pthread_once(&g_once, detect);
    if (!name) return NULL;
    for (int i = 0; i < g_nsets; i++)
        if (strcmp(g_sets[i]->name, name) == 0) return g_sets[i];
    return NULL;
}

const mmoe_kernel_set *mmoe_kernels_best(void) {
    pthread_once(&g_once, detect);
    const char *forced = getenv("MMOE_KERNELS");
    if (forced && *forced) {
        const mmoe_kernel_set *k = mmoe_kernels_by_name(forced);
        if (!k) {
            fprintf(stderr, "mmoe: MMOE_KERNELS=%s is not available on this CPU/build (available:", forced);
            for (int i = 0; i < g_nsets; i++) fprintf(stderr, " %s", g_names[i]);
            fprintf(stderr, ")\n");
        }
        return k;
    }
    return g_sets[g_nsets - 1];
}
