/* A tiny persistent pthread pool: mmoe_pool_run(fn, arg, n) runs fn(arg, i, n) for i < n, task 0 on the
 * caller, task i on worker i, and returns when all are done. One job at a time (the engine is sequential). */
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"

struct mmoe_pool {
    int n;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned long gen;
    int pending, quit;
    mmoe_task_fn fn;
    void *arg;
    int n_tasks;
};

typedef struct {
    mmoe_pool *p;
    int id;
} worker_arg;

static void *worker(void *a_) {
    worker_arg *a = a_;
    mmoe_pool *p = a->p;
    int id = a->id;
    free(a);
    unsigned long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (p->gen == seen && !p->quit) pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        mmoe_task_fn fn = p->fn;
        void *arg = p->arg;
        int nt = p->n_tasks;
        pthread_mutex_unlock(&p->mu);
        if (id < nt) fn(arg, id, nt);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

mmoe_pool *mmoe_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    mmoe_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
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
    p->quit = 1;
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
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    p->pending = p->n - 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    fn(arg, 0, n_tasks);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
