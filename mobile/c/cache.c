/* Expert cache: run a model whose routed experts do not fit the memory budget (mobile/README.md, "Running
 * under a memory budget").
 *
 * Every MoE layer owns S slots of one expert record each (the same S for every layer; S >= top_k). When the
 * router of a layer has chosen its experts, mmoe_cache_begin splits them into those already in a slot (hits)
 * and the others, picks victims for as many of the others as there are slots not holding an expert of this
 * wave, and hands those reads to the I/O threads at once; model.c computes the hits (and the shared expert)
 * while the reads run, then computes each loaded one as its read completes (mmoe_cache_wait_some). A
 * prefill chunk can select more experts than S: it then runs in several waves. A record is read with pread into its slot, never through
 * a mapping: O_DIRECT where the filesystem takes it (the 4096-aligned span around the record; the record's
 * bytes land at slot + offset % 4096, so their alignment is the mapping's), else plain pread followed by
 * posix_fadvise(DONTNEED) on the span, so that neither the page cache hides the flash reads nor (had it been
 * mapped) RSS grows past the budget.
 *
 * Policies (victim among the slots not used by the current wave; empty slots first):
 *   lru  least recently used slot;
 *   lfu  the cached expert with the fewest token slots routed to it since the context was made (its history
 *        is kept while it is not cached), ties to the least recently used;
 *   pin  after each prompt (an eval from position 0) the S - top_k experts of each layer the prompt routed the
 *        most tokens to become that layer's hot set: they are evicted only when nothing else can be, the other
 *        slots are LRU. Before the first prompt ends it is LRU.
 * The policy changes which bytes are read, never what is computed: outputs are those of the resident engine.
 *
 * Prefetch (opt-in, decode): model.c guesses the next MoE layer's top-k from the current hidden state and
 * mmoe_cache_prefetch reads the guessed experts that are not cached into that layer's victim slots, on the
 * same I/O threads but behind every read of the current wave (demand reads are always taken first). The
 * next mmoe_cache_begin of that layer settles the batch: reads no thread has started are cancelled (their
 * slots emptied), started ones are waited for (counted as stall). A prefetched slot that the real routing
 * has not selected yet is the first victim after empty slots, so a wrong guess gives back the slot it took
 * (the policy's next victim) rather than pushing out a second expert. Prefetch only fills slots: what is
 * computed is decided by the real routing. */
#define _GNU_SOURCE /* O_DIRECT */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define IO_ALIGN 4096u
#define IO_THREADS_MAX 16

const char *const mmoe_cache_policy_names[3] = {"lru", "lfu", "pin"};
const char *const mmoe_cache_stat_names[MMOE_CS_COUNT] = {
    "hits", "misses", "evictions", "bytes_read", "read_ns", "stall_ns", "slots_per_layer", "slot_bytes",
    "moe_layers", "policy", "direct_io", "io_threads", "budget", "min_budget", "resident_bytes", "prefetch",
    "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled"};

typedef struct {
    uint64_t off, len;
    uint8_t *slot;
    int idx; /* its place in the wave (mmoe_cache_begin's loaded[]) */
} io_req;

struct mmoe_cache {
    const mmoe_model *m;
    int S, E, K, n_moe, policy, n_io, direct;
    size_t slot_bytes, rec_bytes;
    uint8_t *mem;          /* n_moe * S slots of slot_bytes, IO_ALIGN-aligned */
    int *moe_idx;          /* layer -> MoE layer index, -1 for a dense layer */
    int32_t *slot_expert;  /* [n_moe][S], -1 empty */
    uint32_t *slot_lead;   /* [n_moe][S]: where the record starts in the slot (its file offset % IO_ALIGN) */
    uint64_t *slot_tick;   /* [n_moe][S]: last use */
    int32_t *expert_slot;  /* [n_moe][E], -1 not cached */
    uint64_t *freq;        /* [n_moe][E]: token slots routed since the context was made (lfu) */
    uint64_t *pcount;      /* [n_moe][E]: token slots of the current / last prompt (pin) */
    uint8_t *hot;          /* [n_moe][E]: pinned (pin) */
    uint8_t *busy;         /* [S]: slot holds an expert of the current wave */
    int32_t *wave_slots;   /* slots being loaded by the current wave (invalidated if a read fails) */
    int n_wave, cur_layer;
    uint64_t tick;
    int learning;
    uint64_t hits, misses, evictions, bytes_read, stall_ns;
    /* prefetch: one batch of at most K reads into MoE layer pf_li's slots, settled by that layer's next begin */
    uint8_t *pf_mark;      /* [n_moe][S]: holds a prefetched expert the routing has not selected since */
    uint8_t *pbusy;        /* [S]: slots the batch being planned keeps */
    io_req *pq;            /* [K] */
    int32_t *pslot;        /* [K]: the slot of pq[i] */
    uint8_t *pfail;        /* [K]: its read failed */
    int pnq, pf_li;        /* requests in the batch (0: none outstanding), their MoE layer */
    uint64_t pf_issued, pf_used, pf_wasted, pf_cancelled;
    /* I/O threads: one batch at a time (the engine waits for a wave before planning the next) */
    pthread_t th[IO_THREADS_MAX];
    int n_started;
    pthread_mutex_t mu;
    pthread_cond_t have, done;
    io_req *q;
    uint8_t *rdone;        /* [S]: 1 = read finished, 2 = handed to the engine */
    int qn, qhead, inflight, taken, quit, io_err;
    int pqn, pqhead, pinflight; /* the prefetch queue: pq[pqhead..pqn) not started, pinflight running */
    uint64_t read_ns;
    char io_msg[200];
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

int mmoe_model_moe_layers(const mmoe_model *m) {
    int n = 0;
    for (uint32_t l = 0; l < m->cfg.n_layers; l++) n += m->layers[l].is_moe;
    return n;
}

static size_t rec_bytes(const mmoe_model *m) {
    for (uint32_t l = 0; l < m->cfg.n_layers; l++)
        if (m->layers[l].is_moe) return m->layers[l].experts.rec_bytes;
    return 0;
}

size_t mmoe_cache_slot_bytes(const mmoe_model *m) {
    size_t r = rec_bytes(m);
    return r ? round_up(r + IO_ALIGN - 1, IO_ALIGN) : 0;
}

size_t mmoe_cache_meta_bytes(const mmoe_model *m, int S) {
    size_t nm = (size_t)mmoe_model_moe_layers(m), E = m->cfg.n_experts ? m->cfg.n_experts : 1, s = (size_t)S;
    return sizeof(struct mmoe_cache) + sizeof(int) * m->cfg.n_layers + nm * s * (4 + 4 + 8) +
           nm * E * (4 + 8 + 8 + 1) + s * (1 + 4 + sizeof(io_req)) + nm * s + s +
           (size_t)m->cfg.top_k * (sizeof(io_req) + 4 + 1);
}

/* One record into its slot. *direct: try O_DIRECT first; cleared when the filesystem refuses this read's
 * alignment (EINVAL), and the read is then redone buffered. */
static int read_record(mmoe_cache *c, const io_req *r, int *direct, char *msg, size_t ml) {
    const mmoe_model *m = c->m;
    uint64_t lead = r->off % IO_ALIGN, aoff = r->off - lead, need = lead + r->len;
    uint64_t alen = round_up(need, IO_ALIGN), got = 0;
    if (*direct) {
        while (got < need) {
            ssize_t k = pread(m->fd_direct, r->slot + got, alen - got, (off_t)(aoff + got));
            if (k < 0 && errno == EINTR) continue;
            if ((k < 0 && errno == EINVAL) || (k > 0 && got + (uint64_t)k < need && (got + (uint64_t)k) % IO_ALIGN)) {
                *direct = 0; /* not aligned I/O after all: buffered from now on */
                break;
            }
            if (k <= 0) {
                snprintf(msg, ml, "expert read at offset %llu failed (%s)", (unsigned long long)r->off,
                         k < 0 ? strerror(errno) : "end of file: was the file truncated?");
                return -1;
            }
            got += (uint64_t)k;
        }
        if (*direct) return 0;
    }
    uint8_t *dst = r->slot + lead;
    got = 0;
    while (got < r->len) {
        ssize_t k = pread(m->fd, dst + got, r->len - got, (off_t)(r->off + got));
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            snprintf(msg, ml, "expert read at offset %llu failed (%s)", (unsigned long long)r->off,
                     k < 0 ? strerror(errno) : "end of file: was the file truncated?");
            return -1;
        }
        got += (uint64_t)k;
    }
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(m->fd, (off_t)aoff, (off_t)alen, POSIX_FADV_DONTNEED);
#endif
    return 0;
}

static void *io_worker(void *arg) {
    mmoe_cache *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->qhead == c->qn && c->pqhead == c->pqn) pthread_cond_wait(&c->have, &c->mu);
        if (c->quit) break;
        int pf = c->qhead == c->qn; /* the current wave's reads first: compute is waiting for them */
        io_req r = pf ? c->pq[c->pqhead++] : c->q[c->qhead++];
        if (pf) c->pinflight++;
        int direct = c->direct;
        pthread_mutex_unlock(&c->mu);
        char msg[200] = "";
        uint64_t t0 = now_ns();
        int rc = read_record(c, &r, &direct, msg, sizeof msg);
        uint64_t dt = now_ns() - t0;
        pthread_mutex_lock(&c->mu);
        c->read_ns += dt;
        if (!direct) c->direct = 0;
        if (pf) { /* a failed prefetch is no error: its slot is emptied and a real use reads (and reports) it */
            c->pfail[r.idx] = rc != 0;
            c->pinflight--;
            pthread_cond_signal(&c->done);
            continue;
        }
        if (rc && !c->io_err) {
            c->io_err = 1;
            memcpy(c->io_msg, msg, sizeof msg);
        }
        c->rdone[r.idx] = 1;
        c->inflight--;
        pthread_cond_signal(&c->done); /* one waiter: the engine */
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

void mmoe_cache_free(mmoe_cache *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_cond_broadcast(&c->have);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->n_started; i++) pthread_join(c->th[i], NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->have);
    pthread_cond_destroy(&c->done);
    void *bufs[] = {c->mem, c->moe_idx, c->slot_expert, c->slot_lead, c->slot_tick, c->expert_slot, c->freq,
                    c->pcount, c->hot, c->busy, c->wave_slots, c->q, c->rdone, c->pf_mark, c->pbusy, c->pq,
                    c->pslot, c->pfail};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(c);
}

mmoe_cache *mmoe_cache_new(const mmoe_model *m, int S, int policy, int io_threads, char *err, size_t errlen) {
    if (!m->stream) {
        mmoe_seterr(err, errlen, "an expert cache needs a model opened with mmoe_model_open_streaming");
        return NULL;
    }
    if (policy < MMOE_CACHE_LRU || policy > MMOE_CACHE_PIN) {
        mmoe_seterr(err, errlen, "unknown cache policy %d", policy);
        return NULL;
    }
    if (io_threads < 1 || io_threads > IO_THREADS_MAX) {
        mmoe_seterr(err, errlen, "io threads must be in [1, %d], got %d", IO_THREADS_MAX, io_threads);
        return NULL;
    }
    mmoe_cache *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->have, NULL);
    pthread_cond_init(&c->done, NULL);
    c->m = m;
    c->S = S;
    c->E = (int)m->cfg.n_experts;
    c->K = (int)m->cfg.top_k;
    c->n_moe = mmoe_model_moe_layers(m);
    c->policy = policy;
    c->n_io = io_threads;
    c->direct = m->fd_direct >= 0;
    c->rec_bytes = rec_bytes(m);
    c->slot_bytes = mmoe_cache_slot_bytes(m);
    size_t nm = (size_t)c->n_moe, s = (size_t)S, E = c->E ? (size_t)c->E : 1;
    c->moe_idx = malloc(sizeof(int) * m->cfg.n_layers);
    if (!c->moe_idx) goto oom;
    for (uint32_t l = 0, k = 0; l < m->cfg.n_layers; l++) c->moe_idx[l] = m->layers[l].is_moe ? (int)k++ : -1;
    if (nm) {
        /* every record range lies inside the file: the loader checked each tensor's range and its size ==
         * E * rec_bytes; checked again here, on the numbers this read path uses */
        for (uint32_t l = 0; l < m->cfg.n_layers; l++) {
            const mmoe_experts *x = &m->layers[l].experts;
            if (!m->layers[l].is_moe) continue;
            if (x->rec_bytes != c->rec_bytes || x->file_off > m->size ||
                (uint64_t)c->E * x->rec_bytes > m->size - x->file_off) {
                mmoe_seterr(err, errlen, "layer %u: expert records out of the file", l);
                mmoe_cache_free(c);
                return NULL;
            }
        }
        if (posix_memalign((void **)&c->mem, IO_ALIGN, nm * s * c->slot_bytes)) c->mem = NULL;
        c->slot_expert = malloc(sizeof(int32_t) * nm * s);
        c->slot_lead = calloc(nm * s, sizeof(uint32_t));
        c->slot_tick = calloc(nm * s, sizeof(uint64_t));
        c->expert_slot = malloc(sizeof(int32_t) * nm * E);
        c->freq = calloc(nm * E, sizeof(uint64_t));
        c->pcount = calloc(nm * E, sizeof(uint64_t));
        c->hot = calloc(nm * E, 1);
        c->busy = calloc(s, 1);
        c->wave_slots = malloc(sizeof(int32_t) * s);
        c->q = malloc(sizeof(io_req) * s);
        c->rdone = calloc(s, 1);
        c->pf_mark = calloc(nm * s, 1);
        c->pbusy = calloc(s, 1);
        c->pq = malloc(sizeof(io_req) * (size_t)c->K);
        c->pslot = malloc(sizeof(int32_t) * (size_t)c->K);
        c->pfail = calloc((size_t)c->K, 1);
        if (!c->mem || !c->slot_expert || !c->slot_lead || !c->slot_tick || !c->expert_slot || !c->freq ||
            !c->pcount || !c->hot || !c->busy || !c->wave_slots || !c->q || !c->rdone || !c->pf_mark ||
            !c->pbusy || !c->pq || !c->pslot || !c->pfail)
            goto oom;
        for (size_t i = 0; i < nm * s; i++) c->slot_expert[i] = -1;
        for (size_t i = 0; i < nm * E; i++) c->expert_slot[i] = -1;
        for (int i = 0; i < io_threads; i++) {
            if (pthread_create(&c->th[i], NULL, io_worker, c) != 0) {
                mmoe_seterr(err, errlen, "cannot start the expert I/O threads");
                mmoe_cache_free(c);
                return NULL;
            }
            c->n_started++;
        }
    }
    return c;
oom:
    mmoe_cache_free(c);
    mmoe_seterr(err, errlen, "out of memory allocating the expert cache (%d slots a layer)", S);
    return NULL;
}

/* victim among the slots of MoE layer li not marked in busy, or -1: an empty slot, else a prefetched expert
 * not selected since, else the policy's choice */
static int pick_victim(const mmoe_cache *c, int li, const uint8_t *busy) {
    const int32_t *se = c->slot_expert + (size_t)li * c->S;
    const uint8_t *pm = c->pf_mark + (size_t)li * c->S;
    const uint64_t *tk = c->slot_tick + (size_t)li * c->S;
    const uint64_t *fr = c->freq + (size_t)li * c->E;
    const uint8_t *hot = c->hot + (size_t)li * c->E;
    int best = -1;
    for (int s = 0; s < c->S; s++)
        if (!busy[s] && se[s] < 0) return s;
    for (int s = 0; s < c->S; s++)
        if (!busy[s] && pm[s]) return s;
    for (int s = 0; s < c->S; s++) {
        if (busy[s]) continue;
        if (best < 0) {
            best = s;
            continue;
        }
        int e = se[s], b = se[best];
        int better;
        if (c->policy == MMOE_CACHE_LFU)
            better = fr[e] < fr[b] || (fr[e] == fr[b] && tk[s] < tk[best]);
        else if (c->policy == MMOE_CACHE_PIN)
            better = hot[e] < hot[b] || (hot[e] == hot[b] && tk[s] < tk[best]);
        else
            better = tk[s] < tk[best];
        if (better) best = s;
    }
    return best;
}

/* forget slot s of MoE layer li */
static void slot_clear(mmoe_cache *c, int li, int s) {
    int32_t *se = c->slot_expert + (size_t)li * c->S;
    if (se[s] >= 0) c->expert_slot[(size_t)li * c->E + se[s]] = -1;
    se[s] = -1;
    c->pf_mark[(size_t)li * c->S + s] = 0;
}

/* evict whatever slot s of MoE layer li holds (about to be refilled) */
static void slot_evict(mmoe_cache *c, int li, int s) {
    int32_t *se = c->slot_expert + (size_t)li * c->S;
    if (se[s] < 0) return;
    c->evictions++;
    if (c->pf_mark[(size_t)li * c->S + s]) c->pf_wasted++;
    slot_clear(c, li, s);
}

/* Settle the outstanding prefetch batch: cancel the reads no thread has started, wait for the others. */
static void prefetch_settle(mmoe_cache *c) {
    if (!c->pnq) return;
    uint64_t t0 = now_ns();
    pthread_mutex_lock(&c->mu);
    int started = c->pqhead;
    c->pqn = c->pqhead;
    while (c->pinflight > 0) pthread_cond_wait(&c->done, &c->mu);
    c->pqn = c->pqhead = 0;
    pthread_mutex_unlock(&c->mu);
    c->stall_ns += now_ns() - t0;
    for (int i = 0; i < c->pnq; i++) {
        if (i < started && !c->pfail[i]) {
            c->pf_issued++;
            c->bytes_read += c->rec_bytes;
        } else {
            if (i < started) c->bytes_read += c->rec_bytes; /* a failed read still went to the file */
            c->pf_cancelled++;
            slot_clear(c, c->pf_li, c->pslot[i]);
        }
    }
    c->pnq = 0;
}

void mmoe_cache_prefetch(mmoe_cache *c, int l, const int32_t *guess, int n) {
    prefetch_settle(c); /* normally none is outstanding: each is settled by its layer's begin */
    int li = c->moe_idx[l], S = c->S, nq = 0;
    if (li < 0 || !c->n_started) return;
    int32_t *es = c->expert_slot + (size_t)li * c->E;
    uint64_t *tk = c->slot_tick + (size_t)li * S;
    uint64_t tick = ++c->tick;
    memset(c->pbusy, 0, (size_t)S);
    for (int i = 0; i < n; i++)
        if (es[guess[i]] >= 0) c->pbusy[es[guess[i]]] = 1; /* kept: another guess must not evict it */
    for (int i = 0; i < n && nq < c->K; i++) {
        int e = guess[i];
        if (es[e] >= 0) continue;
        int s = pick_victim(c, li, c->pbusy);
        if (s < 0) break;
        slot_evict(c, li, s);
        uint64_t off = c->m->layers[l].experts.file_off + (uint64_t)e * c->rec_bytes;
        c->slot_expert[(size_t)li * S + s] = e;
        es[e] = s;
        c->pbusy[s] = 1;
        tk[s] = tick;
        c->pf_mark[(size_t)li * S + s] = 1;
        c->slot_lead[(size_t)li * S + s] = (uint32_t)(off % IO_ALIGN);
        c->pq[nq] = (io_req){off, c->rec_bytes, c->mem + ((size_t)li * S + s) * c->slot_bytes, nq};
        c->pslot[nq++] = s;
    }
    if (!nq) return;
    c->pnq = nq;
    c->pf_li = li;
    pthread_mutex_lock(&c->mu);
    memset(c->pfail, 0, (size_t)nq);
    c->pqhead = 0;
    c->pqn = nq;
    pthread_cond_broadcast(&c->have);
    pthread_mutex_unlock(&c->mu);
}

void mmoe_cache_begin(mmoe_cache *c, int l, const int *need, const int *cnt, int n, int first, int *present,
                      int *n_present, int *loaded, int *n_loaded) {
    prefetch_settle(c); /* its slots now hold whole records, or nothing */
    int li = c->moe_idx[l], np = 0, nl = 0, S = c->S;
    int32_t *se = c->slot_expert + (size_t)li * S, *es = c->expert_slot + (size_t)li * c->E;
    uint64_t *tk = c->slot_tick + (size_t)li * S;
    uint8_t *pm = c->pf_mark + (size_t)li * S;
    uint64_t tick = ++c->tick;
    memset(c->busy, 0, (size_t)S);
    for (int i = 0; i < n; i++) {
        int e = need[i], s = es[e];
        if (first) {
            c->freq[(size_t)li * c->E + e] += (uint64_t)cnt[i];
            if (c->learning) c->pcount[(size_t)li * c->E + e] += (uint64_t)cnt[i];
            if (s >= 0) c->hits++;
            else c->misses++;
            if (s >= 0 && pm[s]) {
                c->pf_used++;
                pm[s] = 0;
            }
        }
        if (s >= 0) {
            present[np++] = e;
            c->busy[s] = 1;
            tk[s] = tick;
        }
    }
    c->n_wave = 0;
    for (int i = 0; i < n; i++) {
        int e = need[i];
        if (es[e] >= 0) continue;
        int s = pick_victim(c, li, c->busy);
        if (s < 0) break; /* every slot is used by this wave: the rest waits for the next one */
        slot_evict(c, li, s);
        uint64_t off = c->m->layers[l].experts.file_off + (uint64_t)e * c->rec_bytes;
        se[s] = e;
        es[e] = s;
        c->busy[s] = 1;
        tk[s] = tick;
        c->slot_lead[(size_t)li * S + s] = (uint32_t)(off % IO_ALIGN);
        c->q[nl] = (io_req){off, c->rec_bytes, c->mem + ((size_t)li * S + s) * c->slot_bytes, nl};
        c->wave_slots[c->n_wave++] = s;
        loaded[nl++] = e;
    }
    c->bytes_read += (uint64_t)nl * c->rec_bytes;
    *n_present = np;
    *n_loaded = nl;
    if (nl) {
        pthread_mutex_lock(&c->mu);
        c->qn = nl;
        c->qhead = 0;
        c->inflight = nl;
        c->taken = 0;
        memset(c->rdone, 0, (size_t)nl);
        c->cur_layer = li;
        pthread_cond_broadcast(&c->have);
        pthread_mutex_unlock(&c->mu);
    }
}

int mmoe_cache_wait_some(mmoe_cache *c, int *ready, char *err, size_t errlen) {
    if (!c->n_wave) return 0;
    uint64_t t0 = now_ns();
    int k = 0, bad = 0, li = c->cur_layer;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        if (c->io_err) { /* let the other reads of the wave finish: their slots are forgotten below */
            while (c->inflight > 0) pthread_cond_wait(&c->done, &c->mu);
            mmoe_seterr(err, errlen, "%s", c->io_msg);
            c->io_err = 0;
            bad = 1;
            break;
        }
        for (int i = 0; i < c->qn; i++)
            if (c->rdone[i] == 1) {
                c->rdone[i] = 2;
                ready[k++] = i;
            }
        if (k) break;
        pthread_cond_wait(&c->done, &c->mu);
    }
    c->taken += k;
    int finished = bad || c->taken == c->qn;
    if (finished) c->qn = c->qhead = c->taken = 0;
    pthread_mutex_unlock(&c->mu);
    c->stall_ns += now_ns() - t0;
    if (bad) /* the slots of this wave may hold unknown bytes: forget them all */
        for (int i = 0; i < c->n_wave; i++) slot_clear(c, li, c->wave_slots[i]);
    if (finished) c->n_wave = 0;
    return bad ? -1 : k;
}

const uint8_t *mmoe_cache_record(const mmoe_cache *c, int l, int e) {
    int li = c->moe_idx[l], s = c->expert_slot[(size_t)li * c->E + e];
    return c->mem + ((size_t)li * c->S + s) * c->slot_bytes + c->slot_lead[(size_t)li * c->S + s];
}

void mmoe_cache_prompt_begin(mmoe_cache *c) {
    if (c->n_moe) memset(c->pcount, 0, sizeof(uint64_t) * (size_t)c->n_moe * c->E);
    c->learning = 1;
}

void mmoe_cache_prompt_end(mmoe_cache *c) {
    c->learning = 0;
    if (c->policy != MMOE_CACHE_PIN || !c->n_moe) return;
    int P = c->S - c->K; /* the other top_k slots stay LRU, so a decode step never has to evict a hot expert */
    for (int li = 0; li < c->n_moe; li++) {
        const uint64_t *pc = c->pcount + (size_t)li * c->E;
        uint8_t *hot = c->hot + (size_t)li * c->E;
        memset(hot, 0, (size_t)c->E);
        for (int k = 0; k < P; k++) { /* k-th most routed expert, ties -> lower id; unrouted ones never pinned */
            int best = -1;
            for (int e = 0; e < c->E; e++)
                if (!hot[e] && pc[e] > 0 && (best < 0 || pc[e] > pc[best])) best = e;
            if (best < 0) break;
            hot[best] = 1;
        }
    }
}

void mmoe_cache_stats_get(const mmoe_cache *c, uint64_t *out) {
    out[MMOE_CS_HITS] = c->hits;
    out[MMOE_CS_MISSES] = c->misses;
    out[MMOE_CS_EVICTIONS] = c->evictions;
    out[MMOE_CS_BYTES_READ] = c->bytes_read;
    pthread_mutex_lock((pthread_mutex_t *)&c->mu);
    out[MMOE_CS_READ_NS] = c->read_ns;
    out[MMOE_CS_DIRECT_IO] = (uint64_t)c->direct;
    pthread_mutex_unlock((pthread_mutex_t *)&c->mu);
    out[MMOE_CS_STALL_NS] = c->stall_ns;
    out[MMOE_CS_SLOTS_PER_LAYER] = (uint64_t)c->S;
    out[MMOE_CS_SLOT_BYTES] = c->slot_bytes;
    out[MMOE_CS_MOE_LAYERS] = (uint64_t)c->n_moe;
    out[MMOE_CS_POLICY] = (uint64_t)c->policy;
    out[MMOE_CS_IO_THREADS] = (uint64_t)c->n_io;
    out[MMOE_CS_RESIDENT] = c->m->resident_bytes;
    out[MMOE_CS_PF_ISSUED] = c->pf_issued;
    out[MMOE_CS_PF_USED] = c->pf_used;
    out[MMOE_CS_PF_WASTED] = c->pf_wasted;
    out[MMOE_CS_PF_CANCELLED] = c->pf_cancelled;
}

void mmoe_cache_stats_clear(mmoe_cache *c) {
    c->hits = c->misses = c->evictions = c->bytes_read = c->stall_ns = 0;
    c->pf_issued = c->pf_used = c->pf_wasted = c->pf_cancelled = 0;
    pthread_mutex_lock(&c->mu);
    c->read_ns = 0;
    pthread_mutex_unlock(&c->mu);
}

uint64_t mmoe_read_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtoull(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb * 1024;
}
