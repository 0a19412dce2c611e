/* In-process fuzz driver for the loader (built with ASan + UBSan by `make SANITIZE=1 fuzz`).
 *   mmoe-fuzz VALID.mmoe N SEED
 * Makes N mutants of a valid file (bit flips, truncations, header-field edits, tensor-table edits,
 * tokenizer-blob edits, f32 <-> f16 swaps of a tensor (mostly a router) with the format version changed), loads
 * each from an exactly-sized buffer (so any over-read is an ASan report), and for each mutant the loader accepts
 * runs a short prefill + decode and a tokenize/decode round trip.
 * Every 4th mutant is also written to a file and opened the streaming way (mmoe_model_open_streaming: its own
 * pread-based reads of the resident tensors, then a minimum-budget expert cache that reads experts from the
 * file), which must accept exactly the files the buffer loader accepts and run the same exercise.
 * Prints "cases N accepted A rejected R streamed S f16-router F" (S: streaming opens whose budgeted prefill ran,
 * F: accepted mutants with an f16 router) and exits 0; a sanitizer report aborts with a non-zero
 * status, an accept/reject disagreement between the two opens exits 1. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static uint64_t rng_s;
static uint64_t rnd(void) {
    rng_s ^= rng_s << 13;
    rng_s ^= rng_s >> 7;
    rng_s ^= rng_s << 17;
    return rng_s;
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t interesting(uint64_t old) {
    static const uint64_t v[] = {0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 255, 256, 1023, 1024, 4096, 65535, 65536,
                                 0x7fffffff, 0x80000000u, 0xffffffffu, 0xffffffffffffffffULL, 0x8000000000000000ULL};
    switch (rnd() % 4) {
    case 0: return v[rnd() % (sizeof v / sizeof v[0])];
    case 1: return old + 1 + rnd() % 64;
    case 2: return old - 1 - rnd() % 64;
    default: return rnd();
    }
}

/* Mutate buf (size *n, capacity cap); may shrink *n (truncation). */
static void mutate(uint8_t *buf, size_t *n, const uint8_t *orig) {
    uint64_t table_off = mmoe_rd64(orig + 32), n_t = mmoe_rd32(orig + 24), tok_off = mmoe_rd64(orig + 48),
             tok_size = mmoe_rd64(orig + 56), data_off = mmoe_rd64(orig + 80);
    int kind = (int)(rnd() % 8);
    int reps = 1 + (int)(rnd() % 3);
    for (int r = 0; r < reps; r++) {
        switch (kind) {
        case 0: { /* bit flips anywhere */
            int k = 1 + (int)(rnd() % 8);
            for (int i = 0; i < k; i++) buf[rnd() % *n] ^= (uint8_t)(1u << (rnd() % 8));
            break;
        }
        case 1: { /* bit flips in the metadata (header, table, tokenizer) */
            int k = 1 + (int)(rnd() % 4);
            for (int i = 0; i < k; i++) buf[rnd() % data_off] ^= (uint8_t)(1u << (rnd() % 8));
            break;
        }
        case 2: { /* truncation (sometimes to a metadata boundary) */
            size_t cut = (rnd() & 1) ? rnd() % *n : rnd() % (data_off + 1);
            *n = cut;
            return;
        }
        case 3: { /* header field edit: a 4- or 8-byte field of the first 160 bytes, or a layer kind */
            if (rnd() % 5 == 0) {
                buf[MMOE_LAYER_KINDS_OFFSET + rnd() % 8] = (uint8_t)interesting(0);
            } else {
                size_t off = 8 + 4 * (rnd() % 40);
                if (rnd() & 1) put32(buf + off, (uint32_t)interesting(mmoe_rd32(buf + off)));
                else if (off + 8 <= 168) put64(buf + off, interesting(mmoe_rd64(buf + off)));
            }
            break;
        }
        case 4: { /* tensor-table edit: dtype, ndim, shape, offset or size of one entry */
            uint8_t *e = buf + table_off + MMOE_ENTRY_SIZE * (rnd() % n_t);
            size_t f = 64 + 4 * (rnd() % 10);
            if (f >= 88) {
                f = 88 + 8 * (rnd() % 2);
                put64(e + f, interesting(mmoe_rd64(e + f)));
            } else {
                put32(e + f, (uint32_t)interesting(mmoe_rd32(e + f)));
            }
            if (rnd() % 8 == 0) e[rnd() % 64] = (uint8_t)rnd(); /* name */
            break;
        }
        case 5: { /* tokenizer blob edit: counts, offsets, merges */
            if (tok_size < 16) break;
            size_t off = tok_off + 4 * (rnd() % (tok_size / 4));
            if (rnd() & 1) off = tok_off + 4 + 4 * (rnd() % 3);
            put32(buf + off, (uint32_t)interesting(mmoe_rd32(buf + off)));
            break;
        }
        case 6: { /* an f32 <-> f16 swap of one entry, size kept consistent (so it passes the table checks and
                   * reaches the binder: routers may be f16 in version 2 only), sometimes with the version changed */
            uint64_t pick = rnd() % n_t;
            if (rnd() % 4) /* mostly a router: the tensor whose dtype the format lets vary */
                for (uint64_t k = 0, i = rnd() % n_t; k < n_t; k++, i = (i + 1) % n_t)
                    if (strstr((const char *)orig + table_off + MMOE_ENTRY_SIZE * i, ".moe.router")) {
                        pick = i;
                        break;
                    }
            uint8_t *e = buf + table_off + MMOE_ENTRY_SIZE * pick;
            uint32_t dt = mmoe_rd32(e + 64);
            if (dt <= 1) {
                uint64_t sz = mmoe_rd64(e + 96);
                put32(e + 64, dt ^ 1u);
                put64(e + 96, dt == 0 ? sz / 2 : sz * 2);
            }
            if (rnd() % 4) put32(buf + 8, rnd() % 4 ? 2u : 1u + 2u * (uint32_t)(rnd() % 2)); /* 2 mostly; 1, 3 */
            break;
        }
        default: { /* random bytes over a small metadata span */
            size_t off = rnd() % data_off, len = 1 + rnd() % 16;
            for (size_t i = 0; i < len && off + i < *n; i++) buf[off + i] = (uint8_t)rnd();
            break;
        }
        }
    }
}

/* Returns 1 when a context was made and the prefill ran (0: the context or the prefill refused the model). */
static int exercise(mmoe_model *m, int streaming) {
    char err[256];
    mmoe_ctx *c;
    if (streaming) {
        int64_t min = mmoe_min_budget(m, 1, 8, 1);
        /* the smallest cache (top_k slots a layer) misses most, so the read path runs on nearly every step */
        c = min > 0 ? mmoe_ctx_new_streaming(m, 1, 8, 0, (uint64_t)min, (int)(rnd() % 3), 1, err, sizeof err)
                    : NULL;
    } else {
        c = mmoe_ctx_new(m, 1, 8, 0, err, sizeof err);
    }
    if (!c) return 0;
    int V = (int)mmoe_model_info(m, "vocab_size");
    float *logits = malloc(sizeof(float) * (size_t)V);
    int32_t ids[3] = {0, 1 % V, 2 % V};
    int ran = 0;
    if (logits && mmoe_eval(c, ids, 3, logits, 0, err, sizeof err) == 0) {
        ran = 1;
        uint64_t rng = mmoe_rng_seed(1);
        int32_t t = mmoe_sample(logits, V, 0.8f, 0.9f, &rng);
        mmoe_eval(c, &t, 1, logits, 0, err, sizeof err);
    }
    free(logits);
    mmoe_ctx_free(c);
    static const char text[] = "To be, or not to be: that is the question.\n  Whether 'tis nobler -- 1599!";
    int32_t toks[128];
    int nt = mmoe_tokenize(m, text, sizeof text - 1, toks, 128);
    char piece[64];
    for (int i = 0; i < nt && i < 128; i++) mmoe_token_bytes(m, toks[i], piece, sizeof piece);
    return ran;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: mmoe-fuzz VALID.mmoe N SEED\n");
        return 2;
    }
    char err[512];
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s\n", argv[1]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *orig = NULL;
    if (sz <= 0 || posix_memalign((void **)&orig, 64, (size_t)sz) || fread(orig, 1, (size_t)sz, f) != (size_t)sz) {
        fprintf(stderr, "error: cannot read %s\n", argv[1]);
        return 2;
    }
    fclose(f);
    long n = atol(argv[2]);
    rng_s = (uint64_t)atol(argv[3]) * 0x9E3779B97F4A7C15ULL + 1;
    mmoe_model *m0 = mmoe_model_from_buffer(orig, (size_t)sz, err, sizeof err);
    if (!m0) {
        fprintf(stderr, "error: the seed file does not load: %s\n", err);
        return 2;
    }
    exercise(m0, 0);
    mmoe_model_close(m0);
    const char *tmpdir = getenv("TMPDIR");
    char spath[4096];
    snprintf(spath, sizeof spath, "%s/mmoe-fuzz-%ld.mmoe", tmpdir && *tmpdir ? tmpdir : "/tmp", (long)getpid());
    long accepted = 0, rejected = 0, streamed = 0, f16 = 0;
    for (long i = 0; i < n; i++) {
        uint8_t *work = malloc((size_t)sz);
        if (!work) return 2;
        memcpy(work, orig, (size_t)sz);
        size_t len = (size_t)sz;
        mutate(work, &len, orig);
        uint8_t *buf = NULL; /* exactly len bytes, 64-aligned: ASan sees any read past the end */
        if (posix_memalign((void **)&buf, 64, len ? len : 1)) return 2;
        memcpy(buf, work, len);
        free(work);
        mmoe_model *m = mmoe_model_from_buffer(buf, len, err, sizeof err);
        if (i % 4 == 0) {
            FILE *sf = fopen(spath, "wb");
            if (!sf || fwrite(buf, 1, len, sf) != len || fclose(sf) != 0) {
                fprintf(stderr, "error: cannot write %s\n", spath);
                return 2;
            }
            char serr[512] = "";
            mmoe_model *ms = mmoe_model_open_streaming(spath, serr, sizeof serr);
            if (!ms != !m) {
                fprintf(stderr, "case %ld: the buffer loader %s it but the streaming open %s it (%s)\n", i,
                        m ? "accepted" : "rejected", ms ? "accepted" : "rejected", m ? serr : err);
                remove(spath);
                return 1;
            }
            if (ms) {
                streamed += exercise(ms, 1);
                mmoe_model_close(ms);
            } else if (!serr[0]) {
                fprintf(stderr, "case %ld: streaming open rejected without a message\n", i);
                remove(spath);
                return 1;
            }
        }
        if (m) {
            accepted++;
            int has_f16 = 0; /* accepted mutants that route through an f16 router (the swaps above make them) */
            for (uint32_t l = 0; l < m->cfg.n_layers; l++) has_f16 |= m->layers[l].router_f16 != NULL;
            f16 += has_f16;
            exercise(m, 0);
            mmoe_model_close(m);
        } else {
            rejected++;
            if (!err[0]) {
                fprintf(stderr, "case %ld: rejected without a message\n", i);
                return 1;
            }
        }
        err[0] = 0;
        free(buf);
    }
    remove(spath);
    printf("cases %ld accepted %ld rejected %ld streamed %ld f16-router %ld\n", n, accepted, rejected, streamed, f16);
    free(orig);
    return 0;
}
