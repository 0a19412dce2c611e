/* .mmoe loader: mmap read-only, then validate every header field, table entry and tokenizer byte range
 * before any pointer into the file is formed. Layout: mobile/FORMAT.md (writer: mobile/format.py). */
#define _GNU_SOURCE /* O_DIRECT, MADV_NOHUGEPAGE, MAP_ANONYMOUS */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

void mmoe_seterr(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

uint32_t mmoe_rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
uint64_t mmoe_rd64(const uint8_t *p) { return (uint64_t)mmoe_rd32(p) | (uint64_t)mmoe_rd32(p + 4) << 32; }
static float rdf32(const uint8_t *p) {
    uint32_t u = mmoe_rd32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* [off, off + len) inside [0, size)?  (no overflow) */
static int in_range(uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; }

static int mul_ok(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_mul_overflow(a, b, out); }

/* Expected byte size of a tensor; 0 on overflow / bad dtype. Mirrors mobile/format.py tensor_bytes. */
static uint64_t q4_bytes(uint64_t rows, uint64_t cols) { return rows * cols / 2 + rows * cols / 16; }
static uint64_t align64(uint64_t n) { return (n + 63) / 64 * 64; }
static uint64_t expected_size(uint32_t dtype, uint32_t ndim, const uint32_t *shape) {
    uint64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++)
        if (!mul_ok(n, shape[i], &n)) return 0;
    if (n > ((uint64_t)1 << 40)) return 0;
    switch (dtype) {
    case DT_F32: return 4 * n;
    case DT_F16: return 2 * n;
    case DT_Q4:
        if (shape[ndim - 1] % 32) return 0;
        return q4_bytes(n / shape[ndim - 1], shape[ndim - 1]);
    case DT_Q4_EXPERTS: {
        if (ndim != 3 || shape[1] % 32 || shape[2] % 32) return 0;
        uint64_t F = shape[1], D = shape[2];
        return (uint64_t)shape[0] * (align64(q4_bytes(2 * F, D)) + align64(q4_bytes(D, F)));
    }
    default: return 0;
    }
}

typedef struct {
    char name[MMOE_NAME_LEN];
    uint32_t dtype, ndim, shape[4];
    uint64_t offset, size;
} entry;

typedef struct {
    const uint8_t *data;
    uint64_t size;
    entry *ents;
    uint32_t n;
    char *err;
    size_t errlen;
} binder;

/* Find `name` (exactly once) with the given dtype and shape; returns its data or NULL with err set. */
/* The table entry named `name`; NULL, with the error, when it is missing or appears twice. */
static const entry *find_entry(binder *b, const char *name) {
    const entry *hit = NULL;
    for (uint32_t i = 0; i < b->n; i++) {
        if (strcmp(b->ents[i].name, name) != 0) continue;
        if (hit) {
            mmoe_seterr(b->err, b->errlen, "tensor '%s' appears twice in the table", name);
            return NULL;
        }
        hit = &b->ents[i];
    }
    if (!hit) mmoe_seterr(b->err, b->errlen, "tensor '%s' is missing", name);
    return hit;
}

static const uint8_t *bind(binder *b, const char *name, uint32_t dtype, uint32_t ndim, uint32_t s0, uint32_t s1,
                           uint32_t s2) {
    const entry *hit = find_entry(b, name);
    if (!hit) return NULL;
    uint32_t want[3] = {s0, s1, s2};
    if (hit->dtype != dtype || hit->ndim != ndim) {
        mmoe_seterr(b->err, b->errlen, "tensor '%s': dtype %u / ndim %u, expected %u / %u", name, hit->dtype,
                    hit->ndim, dtype, ndim);
        return NULL;
    }
    for (uint32_t i = 0; i < ndim; i++)
        if (hit->shape[i] != want[i]) {
            mmoe_seterr(b->err, b->errlen, "tensor '%s': shape[%u] = %u inconsistent with the config (expected %u)",
                        name, i, hit->shape[i], want[i]);
            return NULL;
        }
    return b->data + hit->offset;
}

static int bind_q4(binder *b, mmoe_q4_matrix *m, const char *name, uint32_t rows, uint32_t cols) {
    const uint8_t *p = bind(b, name, DT_Q4, 2, rows, cols, 0);
    if (!p) return -1;
    m->qs = p;
    m->d = (const mmoe_fp16 *)(const void *)(p + (size_t)rows * cols / 2);
    m->rows = (int)rows;
    m->cols = (int)cols;
    return 0;
}

static int bind_f32(binder *b, const float **out, const char *name, uint32_t n0, uint32_t n1) {
    const uint8_t *p = n1 ? bind(b, name, DT_F32, 2, n0, n1, 0) : bind(b, name, DT_F32, 1, n0, 0, 0);
    if (!p) return -1;
    *out = (const float *)(const void *)p;
    return 0;
}

/* A layer's router: f32 (E x D), or f16 in a version-2 file; the entry's dtype says which. */
static int bind_router(binder *b, mmoe_layer *L, const char *name, uint32_t E, uint32_t D, uint32_t version) {
    const entry *e = find_entry(b, name);
    if (!e) return -1;
    uint32_t dtype = e->dtype == DT_F16 ? DT_F16 : DT_F32; /* anything else: bind() names the wrong dtype */
    if (dtype == DT_F16 && version < 2) {
        mmoe_seterr(b->err, b->errlen, "tensor '%s': an f16 router needs format version 2 (the file says %u)", name,
                    version);
        return -1;
    }
    const uint8_t *p = bind(b, name, dtype, 2, E, D, 0); /* also rejects a wrong shape */
    if (!p) return -1;
    L->router = dtype == DT_F32 ? (const float *)(const void *)p : NULL;
    L->router_f16 = dtype == DT_F16 ? (const uint16_t *)(const void *)p : NULL;
    return 0;
}

#define CHECK(cond, ...)                                                                                          \
    do {                                                                                                          \
        if (!(cond)) {                                                                                            \
            mmoe_seterr(err, errlen, __VA_ARGS__);                                                                \
            goto fail;                                                                                            \
        }                                                                                                         \
    } while (0)

static int parse(mmoe_model *m, char *err, size_t errlen) {
    const uint8_t *d = m->data;
    uint64_t size = m->size;
    entry *ents = NULL;
    CHECK(size >= MMOE_HEADER_SIZE, "file too small (%llu bytes): truncated or not a .mmoe file",
          (unsigned long long)size);
    CHECK(memcmp(d, MMOE_MAGIC, 8) == 0, "bad magic: not a .mmoe file");
    uint32_t version = mmoe_rd32(d + 8), header_size = mmoe_rd32(d + 12);
    CHECK(version >= MMOE_VERSION_MIN && version <= MMOE_VERSION,
          "unsupported format version %u (this engine reads versions %u-%u)", version, MMOE_VERSION_MIN,
          MMOE_VERSION);
    CHECK(header_size == MMOE_HEADER_SIZE, "header_size %u, expected %u", header_size, MMOE_HEADER_SIZE);
    uint64_t file_size = mmoe_rd64(d + 16);
    CHECK(file_size == size, "file is %llu bytes but the header says %llu (truncated or padded)",
          (unsigned long long)size, (unsigned long long)file_size);
    uint32_t n_tensors = mmoe_rd32(d + 24), flags = mmoe_rd32(d + 28);
    uint64_t table_off = mmoe_rd64(d + 32), table_size = mmoe_rd64(d + 40);
    uint64_t tok_off = mmoe_rd64(d + 48), tok_size = mmoe_rd64(d + 56);
    uint64_t cj_off = mmoe_rd64(d + 64), cj_size = mmoe_rd64(d + 72), data_off = mmoe_rd64(d + 80);
    CHECK(flags == 0, "unknown header flags 0x%x", flags);
    CHECK(n_tensors >= 1 && n_tensors <= 65536, "n_tensors %u out of range", n_tensors);
    CHECK(table_off == MMOE_HEADER_SIZE, "table_offset %llu, expected %u", (unsigned long long)table_off,
          MMOE_HEADER_SIZE);
    CHECK(table_size == (uint64_t)n_tensors * MMOE_ENTRY_SIZE, "table_size %llu != n_tensors * %u",
          (unsigned long long)table_size, MMOE_ENTRY_SIZE);
    CHECK(in_range(table_off, table_size, size), "tensor table out of range of the file");
    CHECK(in_range(tok_off, tok_size, size) && tok_off >= table_off + table_size, "tokenizer range out of the file");
    CHECK(in_range(cj_off, cj_size, size) && cj_off >= table_off + table_size, "config json range out of the file");
    CHECK(data_off % MMOE_ALIGN == 0, "data_offset %llu is not %u-byte aligned", (unsigned long long)data_off,
          MMOE_ALIGN);
    CHECK(data_off >= table_off + table_size && data_off <= size, "data_offset %llu out of range",
          (unsigned long long)data_off);

    /* config */
    mmoe_config *c = &m->cfg;
    const uint8_t *h = d + 88;
    uint32_t *u[] = {&c->vocab_size, &c->d_model, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->head_dim,
                     &c->ffn_dim, &c->max_seq_len, &c->n_experts, &c->top_k, &c->expert_ffn_dim,
                     &c->n_shared_experts, &c->shared_ffn_dim, &c->router_score, &c->norm_topk_prob,
                     &c->tie_embeddings, &c->quant_group};
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++, h += 4) *u[i] = mmoe_rd32(h);
    c->eos_id = (int32_t)mmoe_rd32(h);
    c->rope_theta = rdf32(h + 4);
    c->norm_eps = rdf32(h + 8);
    CHECK(c->vocab_size >= 1 && c->vocab_size <= (1u << 22), "vocab_size %u out of range", c->vocab_size);
    CHECK(c->d_model >= 32 && c->d_model <= (1u << 15) && c->d_model % 32 == 0,
          "d_model %u must be a multiple of 32 in [32, 32768]", c->d_model);
    CHECK(c->n_layers >= 1 && c->n_layers <= MMOE_MAX_LAYERS, "n_layers %u out of range", c->n_layers);
    CHECK(c->n_heads >= 1 && c->n_heads <= 1024 && c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0,
          "n_heads %u / n_kv_heads %u inconsistent", c->n_heads, c->n_kv_heads);
    CHECK(c->head_dim >= 2 && c->head_dim <= 1024 && c->head_dim % 2 == 0, "head_dim %u must be even in [2, 1024]",
          c->head_dim);
    CHECK((c->n_heads * c->head_dim) % 32 == 0 && (c->n_kv_heads * c->head_dim) % 32 == 0,
          "n_heads*head_dim and n_kv_heads*head_dim must be multiples of 32");
    CHECK(c->max_seq_len >= 1 && c->max_seq_len <= (1u << 20), "max_seq_len %u out of range", c->max_seq_len);
    CHECK(c->quant_group == 32, "quant_group %u, the format stores groups of 32", c->quant_group);
    CHECK(c->router_score <= 1 && c->norm_topk_prob <= 1 && c->tie_embeddings <= 1, "bad router/tie flags");
    CHECK(isfinite(c->rope_theta) && c->rope_theta > 1.0f, "rope_theta must be finite and > 1");
    CHECK(isfinite(c->norm_eps) && c->norm_eps >= 0.0f && c->norm_eps < 1.0f, "norm_eps out of range");
    CHECK(c->eos_id >= -1 && c->eos_id < (int32_t)c->vocab_size, "eos_id %d out of range", c->eos_id);
    CHECK(c->n_experts <= 4096, "n_experts %u out of range", c->n_experts);
    /* FFN widths are bounded even where the layer kinds do not use them */
    CHECK(c->ffn_dim <= (1u << 18) && c->expert_ffn_dim <= (1u << 16) && c->shared_ffn_dim <= (1u << 16) &&
              c->n_shared_experts <= 64,
          "ffn_dim %u / expert_ffn_dim %u / shared_ffn_dim %u / n_shared_experts %u out of range", c->ffn_dim,
          c->expert_ffn_dim, c->shared_ffn_dim, c->n_shared_experts);
    if (c->n_experts) {
        CHECK(c->top_k >= 1 && c->top_k <= c->n_experts && c->top_k <= 64, "top_k %u out of range", c->top_k);
        CHECK(c->expert_ffn_dim >= 32 && c->expert_ffn_dim <= (1u << 16) && c->expert_ffn_dim % 32 == 0,
              "expert_ffn_dim %u must be a multiple of 32", c->expert_ffn_dim);
        CHECK(c->n_shared_experts <= 64, "n_shared_experts %u out of range", c->n_shared_experts);
        if (c->n_shared_experts)
            CHECK(c->shared_ffn_dim >= 32 && c->shared_ffn_dim <= (1u << 16) && c->shared_ffn_dim % 32 == 0 &&
                      (uint64_t)c->shared_ffn_dim * c->n_shared_experts <= (1u << 18),
                  "shared_ffn_dim %u out of range", c->shared_ffn_dim);
    } else {
        CHECK(c->top_k == 0, "top_k %u for a dense model", c->top_k);
    }
    int any_dense = 0;
    for (uint32_t i = 0; i < c->n_layers; i++) {
        uint8_t k = d[MMOE_LAYER_KINDS_OFFSET + i];
        CHECK(k <= 1 && (k == 0 || c->n_experts > 0), "layer %u: bad layer kind %u", i, k);
        any_dense |= k == 0;
    }
    if (any_dense)
        CHECK(c->ffn_dim >= 32 && c->ffn_dim <= (1u << 18) && c->ffn_dim % 32 == 0, "ffn_dim %u out of range",
              c->ffn_dim);

    /* tensor table: every entry checked before any is used */
    ents = calloc(n_tensors, sizeof *ents);
    CHECK(ents, "out of memory");
    uint64_t prev_end = data_off;
    for (uint32_t i = 0; i < n_tensors; i++) {
        const uint8_t *e = d + table_off + (uint64_t)i * MMOE_ENTRY_SIZE;
        entry *t = &ents[i];
        memcpy(t->name, e, MMOE_NAME_LEN);
        CHECK(memchr(t->name, 0, MMOE_NAME_LEN) != NULL && t->name[0], "tensor %u: name not NUL-terminated", i);
        t->dtype = mmoe_rd32(e + 64);
        t->ndim = mmoe_rd32(e + 68);
        for (int j = 0; j < 4; j++) t->shape[j] = mmoe_rd32(e + 72 + 4 * j);
        t->offset = mmoe_rd64(e + 88);
        t->size = mmoe_rd64(e + 96);
        CHECK(t->dtype <= DT_Q4_EXPERTS, "tensor '%s': unknown dtype %u", t->name, t->dtype);
        CHECK(t->ndim >= 1 && t->ndim <= 4, "tensor '%s': ndim %u out of range", t->name, t->ndim);
        for (uint32_t j = 0; j < 4; j++)
            CHECK(j < t->ndim ? (t->shape[j] >= 1 && t->shape[j] <= (1u << 24)) : t->shape[j] == 0,
                  "tensor '%s': bad shape[%u] = %u", t->name, j, t->shape[j]);
        uint64_t want = expected_size(t->dtype, t->ndim, t->shape);
        CHECK(want && t->size == want, "tensor '%s': size %llu inconsistent with its dtype and shape (%llu)",
              t->name, (unsigned long long)t->size, (unsigned long long)want);
        CHECK(t->offset % MMOE_ALIGN == 0, "tensor '%s': offset %llu is misaligned (needs %u)", t->name,
              (unsigned long long)t->offset, MMOE_ALIGN);
        CHECK(in_range(t->offset, t->size, size) && t->offset >= prev_end,
              "tensor '%s': offset %llu + size %llu out of range (file %llu bytes)", t->name,
              (unsigned long long)t->offset, (unsigned long long)t->size, (unsigned long long)size);
        prev_end = t->offset + t->size;
    }

    binder b = {d, size, ents, n_tensors, err, errlen};
    uint32_t D = c->d_model, V = c->vocab_size, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim;
    if (bind_q4(&b, &m->tok_emb, "tok_emb", V, D)) goto fail;
    if (c->tie_embeddings) {
        m->lm_head = m->tok_emb;
    } else if (bind_q4(&b, &m->lm_head, "lm_head", V, D)) {
        goto fail;
    }
    if (bind_f32(&b, &m->norm, "norm", D, 0)) goto fail;
    m->layers = calloc(c->n_layers, sizeof *m->layers);
    CHECK(m->layers, "out of memory");
    char nm[MMOE_NAME_LEN + 32];
    for (uint32_t i = 0; i < c->n_layers; i++) {
        mmoe_layer *L = &m->layers[i];
#define NM(s) (snprintf(nm, sizeof nm, "layers.%u.%s", i, s), nm)
        if (bind_f32(&b, &L->attn_norm, NM("attn_norm"), D, 0) || bind_f32(&b, &L->ffn_norm, NM("ffn_norm"), D, 0) ||
            bind_q4(&b, &L->wq, NM("attn.wq"), H * hd, D) || bind_q4(&b, &L->wk, NM("attn.wk"), KV * hd, D) ||
            bind_q4(&b, &L->wv, NM("attn.wv"), KV * hd, D) || bind_q4(&b, &L->wo, NM("attn.wo"), D, H * hd))
            goto fail;
        L->is_moe = d[MMOE_LAYER_KINDS_OFFSET + i] == 1;
        if (L->is_moe) {
            uint32_t E = c->n_experts, F = c->expert_ffn_dim;
            if (bind_router(&b, L, NM("moe.router"), E, D, version) ||
                bind_f32(&b, &L->expert_bias, NM("moe.expert_bias"), E, 0))
                goto fail;
            const uint8_t *p = bind(&b, NM("moe.experts"), DT_Q4_EXPERTS, 3, E, F, D);
            if (!p) goto fail;
            L->experts.base = p;
            L->experts.file_off = (uint64_t)(p - d);
            L->experts.down_off = align64(q4_bytes(2 * (uint64_t)F, D));
            L->experts.rec_bytes = L->experts.down_off + align64(q4_bytes(D, F));
            L->experts.F = (int)F;
            L->experts.D = (int)D;
            L->has_shared = c->n_shared_experts > 0;
            if (L->has_shared) {
                uint32_t S = c->n_shared_experts * c->shared_ffn_dim;
                if (bind_q4(&b, &L->sh_gate_up, NM("moe.shared.w_gate_up"), 2 * S, D) ||
                    bind_q4(&b, &L->sh_down, NM("moe.shared.w_down"), D, S))
                    goto fail;
            }
        } else {
            L->has_shared = 1; /* the dense SwiGLU runs through the same code as a shared expert */
            if (bind_q4(&b, &L->sh_gate_up, NM("ffn.w_gate_up"), 2 * c->ffn_dim, D) ||
                bind_q4(&b, &L->sh_down, NM("ffn.w_down"), D, c->ffn_dim))
                goto fail;
        }
#undef NM
    }
    if (mmoe_tokenizer_init(&m->tok, d + tok_off, tok_size, c->vocab_size, err, errlen)) goto fail;
    free(ents);
    return 0;
fail:
    free(ents);
    return -1;
}

static void model_free(mmoe_model *m) {
    if (!m) return;
    mmoe_tokenizer_free(&m->tok);
    free(m->layers);
    if (m->mapped) munmap((void *)m->data, m->size);
    if (m->fd >= 0) close(m->fd);
    if (m->fd_direct >= 0) close(m->fd_direct);
    free(m);
}

static mmoe_model *model_alloc(void) {
    mmoe_model *m = calloc(1, sizeof *m);
    if (m) m->fd = m->fd_direct = -1;
    return m;
}

mmoe_model *mmoe_model_from_buffer(const void *buf, size_t size, char *err, size_t errlen) {
    if (!buf || ((uintptr_t)buf % MMOE_ALIGN) != 0) {
        mmoe_seterr(err, errlen, "buffer must be non-NULL and %u-byte aligned", MMOE_ALIGN);
        return NULL;
    }
    mmoe_model *m = model_alloc();
    if (!m) {
        mmoe_seterr(err, errlen, "out of memory");
        return NULL;
    }
    m->data = buf;
    m->size = size;
    if (parse(m, err, errlen)) {
        model_free(m);
        return NULL;
    }
    return m;
}

/* keep_fd: the descriptor stays open in m->fd (streaming) instead of being closed after the mmap */
static mmoe_model *open_mapped(const char *path, int keep_fd, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        mmoe_seterr(err, errlen, "%s: cannot open (%s)", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        mmoe_seterr(err, errlen, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < (off_t)MMOE_HEADER_SIZE) {
        mmoe_seterr(err, errlen, "%s: file too small (%lld bytes): truncated or not a .mmoe file", path,
                    (long long)st.st_size);
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (!keep_fd) close(fd);
    if (p == MAP_FAILED) {
        mmoe_seterr(err, errlen, "%s: mmap failed (%s)", path, strerror(errno));
        if (keep_fd) close(fd);
        return NULL;
    }
    mmoe_model *m = model_alloc();
    if (!m) {
        munmap(p, (size_t)st.st_size);
        if (keep_fd) close(fd);
        mmoe_seterr(err, errlen, "out of memory");
        return NULL;
    }
    if (keep_fd) m->fd = fd;
    m->data = p;
    m->size = (size_t)st.st_size;
    m->mapped = 1;
    char e2[256] = "";
    if (parse(m, e2, sizeof e2)) {
        mmoe_seterr(err, errlen, "%s: %s", path, e2);
        model_free(m);
        return NULL;
    }
    return m;
}

mmoe_model *mmoe_model_open(const char *path, char *err, size_t errlen) { return open_mapped(path, 0, err, errlen); }

typedef struct {
    uint64_t off, end;
} span;

/* pread [off, off + len) of fd into dst; -1 on an error or a short file */
static int pread_all(int fd, uint8_t *dst, uint64_t off, uint64_t len) {
    uint64_t got = 0;
    while (got < len) {
        ssize_t k = pread(fd, dst + got, len - got, (off_t)(off + got));
        if (k < 0 && errno == EINTR) continue;
        if (k == 0) errno = 0;
        if (k <= 0) return -1;
        got += (uint64_t)k;
    }
    return 0;
}

/* Streaming open: validate through the mapping (only the header, the table and the tokenizer are touched),
 * drop the mapping, then pread every byte outside the routed-expert tensors into an anonymous region of the
 * file's size at the same offsets and parse that copy again (so every pointer the binder forms is into memory
 * we own and was validated on the bytes it points at). The experts' ranges of the region are never touched,
 * so they never become resident; NOHUGEPAGE keeps a huge page from making a hole resident. Why not keep the
 * mapping for the resident tensors: mapped file pages count toward RSS like anonymous ones but the kernel's
 * fault-around also maps neighbouring cached pages, expert bytes included, and would blur the budget. */
mmoe_model *mmoe_model_open_streaming(const char *path, char *err, size_t errlen) {
    mmoe_model *m = open_mapped(path, 1, err, errlen);
    if (!m) return NULL;
    uint32_t nl = m->cfg.n_layers, ns = 0;
    span *sp = malloc(sizeof(span) * (nl + 1));
    if (!sp) {
        model_free(m);
        mmoe_seterr(err, errlen, "out of memory");
        return NULL;
    }
    for (uint32_t l = 0; l < nl; l++) /* the expert tensors' ranges, sorted by offset (they never overlap) */
        if (m->layers[l].is_moe) {
            const mmoe_experts *x = &m->layers[l].experts;
            span v = {x->file_off, x->file_off + (uint64_t)m->cfg.n_experts * x->rec_bytes};
            uint32_t i = ns++;
            while (i > 0 && sp[i - 1].off > v.off) {
                sp[i] = sp[i - 1];
                i--;
            }
            sp[i] = v;
        }
    uint64_t size = m->size, tok_off = mmoe_rd64(m->data + 48), tok_size = mmoe_rd64(m->data + 56);
    mmoe_tokenizer_free(&m->tok);
    memset(&m->tok, 0, sizeof m->tok);
    free(m->layers);
    m->layers = NULL;
    munmap((void *)m->data, m->size);
    m->mapped = 0;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        free(sp);
        model_free(m);
        mmoe_seterr(err, errlen, "%s: cannot reserve %llu bytes of address space (%s)", path,
                    (unsigned long long)size, strerror(errno));
        return NULL;
    }
#ifdef MADV_NOHUGEPAGE
    madvise(p, size, MADV_NOHUGEPAGE);
#endif
    m->data = p;
    m->mapped = 1;
    uint64_t at = 0, resident = 0;
    int bad = 0, tok_done = 0, rd_errno = 0;
    for (uint32_t i = 0; i <= ns && !bad; i++) { /* the gaps between expert tensors */
        uint64_t end = i < ns ? sp[i].off : size;
        if (end > at) {
            bad = pread_all(m->fd, (uint8_t *)p + at, at, end - at);
            resident += (end + 4095) / 4096 * 4096 - at / 4096 * 4096;
            tok_done |= tok_off >= at && tok_size <= end - tok_off;
        }
        if (i < ns) at = sp[i].end;
    }
    if (!bad && !tok_done) { /* a tokenizer blob overlapping expert bytes (validated in range, so legal) */
        bad = pread_all(m->fd, (uint8_t *)p + tok_off, tok_off, tok_size);
        resident += tok_size + 8192;
    }
    if (bad) rd_errno = errno;
    free(sp);
#ifdef POSIX_FADV_DONTNEED
    posix_fadvise(m->fd, 0, 0, POSIX_FADV_DONTNEED); /* the copies are ours: leave the page cache as it was */
#endif
    char e2[256] = "";
    if (bad) {
        mmoe_seterr(err, errlen, "%s: read failed while loading (%s)", path,
                    rd_errno ? strerror(rd_errno) : "short read: was the file truncated?");
        model_free(m);
        return NULL;
    }
    if (parse(m, e2, sizeof e2)) { /* the file changed under us */
        mmoe_seterr(err, errlen, "%s: %s", path, e2);
        model_free(m);
        return NULL;
    }
    for (uint32_t l = 0; l < nl; l++)
        if (m->layers[l].is_moe) m->layers[l].experts.base = NULL; /* only through the cache from now on */
    m->stream = 1;
    m->resident_bytes = resident;
#ifdef O_DIRECT
    const char *nd = getenv("MMOE_NO_DIRECT");
    if (!(nd && *nd && strcmp(nd, "0"))) {
        int fd = open(path, O_RDONLY | O_DIRECT);
        struct stat a, b;
        if (fd >= 0 && fstat(fd, &a) == 0 && fstat(m->fd, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
            m->fd_direct = fd;
        else if (fd >= 0)
            close(fd);
    }
#endif
    m->open_rss = mmoe_read_rss();
    return m;
}

void mmoe_model_close(mmoe_model *m) { model_free(m); }

int64_t mmoe_model_info(const mmoe_model *m, const char *key) {
    const mmoe_config *c = &m->cfg;
    struct { const char *k; int64_t v; } t[] = {
        {"vocab_size", c->vocab_size}, {"d_model", c->d_model}, {"n_layers", c->n_layers},
        {"n_heads", c->n_heads}, {"n_kv_heads", c->n_kv_heads}, {"head_dim", c->head_dim},
        {"n_experts", c->n_experts}, {"top_k", c->top_k}, {"max_seq_len", c->max_seq_len},
        {"eos_id", c->eos_id}, {"tok_vocab", m->tok.n_vocab}, {"file_size", (int64_t)m->size},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strcmp(t[i].k, key) == 0) return t[i].v;
    return -1;
}
