/* A tiny persistent pthread pool: mmoe_pool_run(fn, arg, n) runs fn(arg, i, n) for i < n, task 0 on the
 * caller, task i on worker i, and returns when all are done. One job at a time (the engine is sequential).
 *
 * Waiting: workers and the caller first spin (yielding) for MMOE_SPIN_US microseconds (default 50) on an atomic
 * job counter, then block on condition variables. Decode runs ~5 short jobs per layer, so a futex wake-up per job
 * dominates when every thread has a core of its own (a phone's big cores): on the quiet 2-vCPU dev VM, S decode at
 * 2 threads ran 35.1 tok/s blocking vs 79.8 tok/s with a 50 us spin (1 thread: 51.0 vs 54.7). On an
 * oversubscribed machine spinning cost 3-4x at 2 threads: set MMOE_SPIN_US=0 there. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

/* Spin budget in microseconds before blocking: MMOE_SPIN_US from the environment (0 = always block). */
#define MMOE_SPIN_US_DEFAULT 50L

struct mmoe_pool {
    int n;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    atomic_ulong gen;     /* job number; a new value publishes fn/arg/n_tasks */
    atomic_int pending;   /* workers that have not finished the current job */
    atomic_int sleepers;  /* workers blocked (or about to block) on `go` */
    atomic_int quit;
    mmoe_task_fn fn;
    void *arg;
    int n_tasks;
    long spin_ns;
};

typedef struct {
    mmoe_pool *p;
    int id;
} worker_arg;

/* One spin step. sched_yield rather than a pause instruction: on an idle core it returns at once (a
 * sub-microsecond syscall), and on an oversubscribed one it hands the core to the thread we are waiting for
 * instead of burning the time slice that thread needs. */
static inline void cpu_relax(void) { sched_yield(); }

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Spin until *flag (compared by cond) changes or the spin budget runs out; 1 if it changed. */
static int spin_gen(mmoe_pool *p, unsigned long seen) {
    long t0 = 0;
    if (p->spin_ns <= 0) return atomic_load_explicit(&p->gen, memory_order_acquire) != seen || atomic_load(&p->quit);
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(&p->gen, memory_order_acquire) != seen || atomic_load(&p->quit)) return 1;
        cpu_relax();
        if ((i & 15) == 15) {
            long t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > p->spin_ns) return 0;
        }
    }
}

static void *worker(void *a_) {
    worker_arg *a = a_;
    mmoe_pool *p = a->p;
    int id = a->id;
    free(a);
    unsigned long seen = 0;
    for (;;) {
        if (!spin_gen(p, seen)) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->quit)) pthread_cond_wait(&p->go, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->quit)) return NULL;
        seen = atomic_load_explicit(&p->gen, memory_order_acquire);
        int nt = p->n_tasks;
        if (id < nt) p->fn(p->arg, id, nt);
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->mu); /* the caller may be blocked on `done` */
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

mmoe_pool *mmoe_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    mmoe_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    const char *sp = getenv("MMOE_SPIN_US");
    char *end = NULL;
    long us = sp && *sp ? strtol(sp, &end, 10) : MMOE_SPIN_US_DEFAULT;
    if (!sp || !*sp || *end || us < 0 || us > 1000000) us = MMOE_SPIN_US_DEFAULT; /* bad values: the default */
    p->spin_ns = us * 1000L;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->quit, 0);
    if (n_threads > 1) {
        p->th = calloc((size_t)n_threads, sizeof *p->th);
        if (!p->th) {
            mmoe_pool_free(p);
            return NULL;
        }
        for (int i = 1; i < n_threads; i++) {
            worker_arg *a = malloc(sizeof *a);
            if (!a || (a->p = p, a->id = i, pthread_create(&p->th[i], NULL, worker, a) != 0)) {
                free(a);
                p->n = i; /* only the threads started so far */
                mmoe_pool_free(p);
                return NULL;
            }
        }
    }
    return p;
}

void mmoe_pool_free(mmoe_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->quit, 1);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n && p->th; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    free(p);
}

int mmoe_pool_size(const mmoe_pool *p) { return p->n; }

void mmoe_pool_run(mmoe_pool *p, mmoe_task_fn fn, void *arg, int n_tasks) {
    if (n_tasks > p->n) n_tasks = p->n;
    if (n_tasks <= 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    atomic_store(&p->pending, p->n - 1);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: publishes fn/arg/n_tasks, ordered before the sleepers check */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0, n_tasks);
    long t0 = 0;
    for (unsigned i = 0; p->spin_ns > 0 && atomic_load_explicit(&p->pending, memory_order_acquire) > 0; i++) {
        cpu_relax();
        if ((i & 15) == 15) {
            long t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > p->spin_ns) break;
        }
    }
    if (atomic_load_explicit(&p->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
