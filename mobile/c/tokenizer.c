/* Byte-level BPE (GPT-2 / `tokenizers` ByteLevel) encode + decode over the tokenizer blob in the .mmoe file.
 *
 * Pre-tokenizer: the GPT-2 regex
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * evaluated as leftmost-first alternation at each position. Character classes are exact for ASCII and
 * Latin-1; other code points count as letters except the Unicode space characters and the General
 * Punctuation block (an approximation, tested against `tokenizers` on English text).
 * BPE: start from single-byte tokens, repeatedly merge the lowest-rank adjacent pair (leftmost first). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { C_OTHER, C_LETTER, C_NUMBER, C_SPACE };

/* Decode one UTF-8 code point at s[0..n); returns its length (1 for an invalid byte, which counts as a letter). */
static int utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    int len = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || (size_t)len > n) goto bad;
    uint32_t c = len == 1 ? b : len == 2 ? (b & 0x1Fu) : len == 3 ? (b & 0x0Fu) : (b & 0x07u);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) goto bad;
        c = c << 6 | (s[i] & 0x3Fu);
    }
    *cp = c;
    return len;
bad:
    *cp = 0x10FFFF + 1; /* sentinel: a letter */
    return 1;
}

static int char_class(uint32_t c) {
    if (c < 0x80) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return C_LETTER;
        if (c >= '0' && c <= '9') return C_NUMBER;
        if (c == ' ' || (c >= 9 && c <= 13)) return C_SPACE;
        return C_OTHER;
    }
    if (c < 0x100) {
        if (c == 0x85 || c == 0xA0) return C_SPACE;
        if (c == 0xAA || c == 0xB5 || c == 0xBA || (c >= 0xC0 && c != 0xD7 && c != 0xF7)) return C_LETTER;
        if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return C_NUMBER;
        return C_OTHER;
    }
    if (c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
        c == 0x3000)
        return C_SPACE;
    if ((c >= 0x2000 && c <= 0x206F) || (c >= 0x3001 && c <= 0x3003)) return C_OTHER;
    return C_LETTER;
}

typedef struct {
    const uint8_t *s;
    size_t n;
} text;

static int class_at(const text *t, size_t i, int *len) {
    uint32_t cp;
    *len = utf8_next(t->s + i, t->n - i, &cp);
    return char_class(cp);
}

/* Length of the pre-token starting at i (> 0). */
static size_t pretoken(const text *t, size_t i) {
    const uint8_t *s = t->s;
    size_t n = t->n, rest = n - i;
    int len;
    /* contractions */
    if (s[i] == '\'' && rest >= 2) {
        uint8_t a = s[i + 1], b = rest >= 3 ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    /* ' ?' followed by a run of one class (letters, numbers, other) */
    size_t j = i + (s[i] == ' ' && rest >= 2);
    int cls = class_at(t, j, &len);
    if (cls != C_SPACE) {
        size_t k = j + (size_t)len;
        while (k < n) {
            int l2, c2 = class_at(t, k, &l2);
            if (c2 != cls) break;
            k += (size_t)l2;
        }
        return k - i;
    }
    /* whitespace: \s+(?!\S) then \s+ */
    cls = class_at(t, i, &len);
    if (cls == C_SPACE) {
        size_t k = i, last = i;
        while (k < n) {
            int l2, c2 = class_at(t, k, &l2);
            if (c2 != C_SPACE) break;
            last = k;
            k += (size_t)l2;
        }
        if (k == n) return k - i;    /* run reaches the end */
        if (last > i) return last - i; /* leave the last space for the next word */
        return k - i;                 /* a single space before a non-space */
    }
    return (size_t)len; /* unreachable for valid classes; keeps progress guaranteed */
}

static uint64_t hash64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}
static uint32_t hash_bytes(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static uint32_t tok_off(const mmoe_tokenizer *t, uint32_t id) { return mmoe_rd32((const uint8_t *)(t->offs + id)); }

static int merge_lookup(const mmoe_tokenizer *t, int32_t a, int32_t b) {
    if (!t->merge_cap) return -1;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t h = (uint32_t)hash64(key) & (t->merge_cap - 1);; h = (h + 1) & (t->merge_cap - 1)) {
        if (t->merge_vals[h] < 0) return -1;
        if (t->merge_keys[h] == key) return t->merge_vals[h];
    }
}

static int32_t vocab_lookup(const mmoe_tokenizer *t, const uint8_t *p, size_t n) {
    for (uint32_t h = hash_bytes(p, n) & (t->vocab_cap - 1);; h = (h + 1) & (t->vocab_cap - 1)) {
        uint32_t v = t->vocab_hash[h];
        if (!v) return -1;
        uint32_t id = v - 1, o = tok_off(t, id), e = tok_off(t, id + 1);
        if (e - o == n && memcmp(t->pool + o, p, n) == 0) return (int32_t)id;
    }
}

int mmoe_tokenizer_init(mmoe_tokenizer *t, const uint8_t *blob, size_t size, uint32_t vocab_size, char *err,
                        size_t errlen) {
    memset(t, 0, sizeof *t);
    if (size < 16 || memcmp(blob, "TOK1", 4) != 0) {
        mmoe_seterr(err, errlen, "tokenizer blob: bad magic or too small");
        return -1;
    }
    t->n_vocab = mmoe_rd32(blob + 4);
    t->n_merges = mmoe_rd32(blob + 8);
    t->flags = mmoe_rd32(blob + 12);
    if (t->n_vocab < 1 || t->n_vocab > vocab_size || t->flags > 3 || t->n_merges > (1u << 24)) {
        mmoe_seterr(err, errlen, "tokenizer blob: n_vocab %u (model vocab %u) / n_merges %u / flags %u out of range",
                    t->n_vocab, vocab_size, t->n_merges, t->flags);
        return -1;
    }
    uint64_t offs_bytes = 4ull * (t->n_vocab + 1ull);
    if (16 + offs_bytes > size) {
        mmoe_seterr(err, errlen, "tokenizer blob: truncated offsets");
        return -1;
    }
    t->offs = (const uint32_t *)(const void *)(blob + 16);
    uint32_t prev = 0;
    for (uint32_t i = 0; i <= t->n_vocab; i++) {
        uint32_t o = tok_off(t, i);
        if ((i == 0 && o != 0) || o < prev || o > (1u << 28)) {
            mmoe_seterr(err, errlen, "tokenizer blob: vocab offset %u not monotonic", i);
            return -1;
        }
        prev = o;
    }
    uint64_t pool = prev, sp_at = 16 + offs_bytes + pool + 12ull * t->n_merges;
    if (sp_at + 4 > size) {
        mmoe_seterr(err, errlen, "tokenizer blob: size %zu inconsistent with its counts", size);
        return -1;
    }
    t->n_special = mmoe_rd32(blob + sp_at);
    if (t->n_special > 4096 || sp_at + 4 + 8ull * t->n_special != size) {
        mmoe_seterr(err, errlen, "tokenizer blob: size %zu inconsistent with its counts", size);
        return -1;
    }
    t->pool = blob + 16 + offs_bytes;
    t->merges = t->pool + pool;
    t->specials = blob + sp_at + 4;
    for (uint32_t i = 0; i < t->n_special; i++) {
        uint32_t id = mmoe_rd32(t->specials + 8ull * i), fl = mmoe_rd32(t->specials + 8ull * i + 4);
        if (id >= t->n_vocab || fl > 1 || tok_off(t, id + 1) == tok_off(t, id)) {
            mmoe_seterr(err, errlen, "tokenizer blob: special token %u (id %u, flags %u) invalid", i, id, fl);
            return -1;
        }
    }
    for (uint32_t i = 0; i < t->n_merges; i++)
        for (int j = 0; j < 3; j++)
            if (mmoe_rd32(t->merges + 12ull * i + 4 * j) >= t->n_vocab) {
                mmoe_seterr(err, errlen, "tokenizer blob: merge %u refers to a token id out of range", i);
                return -1;
            }
    for (int i = 0; i < 256; i++) t->byte_tok[i] = -1;
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        uint32_t o = tok_off(t, id), e = tok_off(t, id + 1);
        if (e - o == 1 && t->byte_tok[t->pool[o]] < 0) t->byte_tok[t->pool[o]] = (int32_t)id;
    }
    t->vocab_cap = 16;
    while (t->vocab_cap < 2 * t->n_vocab) t->vocab_cap *= 2;
    t->vocab_hash = calloc(t->vocab_cap, sizeof *t->vocab_hash);
    if (t->n_merges) {
        t->merge_cap = 16;
        while (t->merge_cap < 2 * t->n_merges) t->merge_cap *= 2;
        t->merge_keys = malloc((size_t)t->merge_cap * sizeof *t->merge_keys);
        t->merge_vals = malloc((size_t)t->merge_cap * sizeof *t->merge_vals);
    }
    if (!t->vocab_hash || (t->n_merges && (!t->merge_keys || !t->merge_vals))) {
        mmoe_seterr(err, errlen, "out of memory (tokenizer)");
        mmoe_tokenizer_free(t);
        return -1;
    }
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        uint32_t o = tok_off(t, id), e = tok_off(t, id + 1);
        if (e == o || vocab_lookup(t, t->pool + o, e - o) >= 0) continue; /* first id wins */
        uint32_t h = hash_bytes(t->pool + o, e - o) & (t->vocab_cap - 1);
        while (t->vocab_hash[h]) h = (h + 1) & (t->vocab_cap - 1);
        t->vocab_hash[h] = id + 1;
    }
    for (uint32_t h = 0; h < t->merge_cap; h++) t->merge_vals[h] = -1;
    for (uint32_t r = 0; r < t->n_merges; r++) {
        int32_t a = (int32_t)mmoe_rd32(t->merges + 12ull * r), b = (int32_t)mmoe_rd32(t->merges + 12ull * r + 4);
        if (merge_lookup(t, a, b) >= 0) continue; /* lowest rank wins */
        uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
        uint32_t h = (uint32_t)hash64(key) & (t->merge_cap - 1);
        while (t->merge_vals[h] >= 0) h = (h + 1) & (t->merge_cap - 1);
        t->merge_keys[h] = key;
        t->merge_vals[h] = (int32_t)r;
    }
    return 0;
}

void mmoe_tokenizer_free(mmoe_tokenizer *t) {
    free(t->vocab_hash);
    free(t->merge_keys);
    free(t->merge_vals);
    t->vocab_hash = NULL;
    t->merge_keys = NULL;
    t->merge_vals = NULL;
}

/* BPE one pre-token into out (count returned; writes at most cap). sym is scratch of n entries. */
static int bpe(const mmoe_tokenizer *t, const uint8_t *p, size_t n, int32_t *sym, int32_t *out, int cap) {
    if (t->flags & TOK_IGNORE_MERGES) {
        int32_t id = vocab_lookup(t, p, n);
        if (id >= 0) {
            if (cap > 0) out[0] = id;
            return 1;
        }
    }
    size_t m = n;
    for (size_t i = 0; i < n; i++) {
        sym[i] = t->byte_tok[p[i]];
        if (sym[i] < 0) return -1;
    }
    while (m > 1) {
        int best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < m; i++) {
            int r = merge_lookup(t, sym[i], sym[i + 1]);
            if (r >= 0 && (best < 0 || r < best)) {
                best = r;
                at = i;
            }
        }
        if (best < 0) break;
        sym[at] = (int32_t)mmoe_rd32(t->merges + 12ull * (uint32_t)best + 8);
        memmove(sym + at + 1, sym + at + 2, (m - at - 2) * sizeof *sym);
        m--;
    }
    for (size_t i = 0; i < m && (int)i < cap; i++) out[i] = sym[i];
    return (int)m;
}

int mmoe_tokenize(const mmoe_model *model, const char *str, size_t len, int32_t *out, int cap) {
    const mmoe_tokenizer *t = &model->tok;
    uint8_t *buf = NULL;
    const uint8_t *s = (const uint8_t *)str;
    if (len && (t->flags & TOK_ADD_PREFIX_SPACE) && s[0] != ' ') {
        buf = malloc(len + 1);
        if (!buf) return -1;
        buf[0] = ' ';
        memcpy(buf + 1, s, len);
        s = buf;
        len++;
    }
    int32_t *sym = malloc((len ? len : 1) * sizeof *sym);
    if (!sym) {
        free(buf);
        return -1;
    }
    long count = 0;
    size_t seg = 0; /* start of the current ordinary-text segment */
    for (size_t i = 0; i <= len && count >= 0;) {
        /* longest special token starting at i (leftmost-longest, like `tokenizers`' added-token split) */
        int32_t sp = -1;
        size_t sp_len = 0;
        for (uint32_t j = 0; i < len && j < t->n_special; j++) {
            uint32_t id = mmoe_rd32(t->specials + 8ull * j), o = tok_off(t, id), e = tok_off(t, id + 1);
            if (e - o > sp_len && e - o <= len - i && memcmp(s + i, t->pool + o, e - o) == 0) {
                sp = (int32_t)id;
                sp_len = e - o;
            }
        }
        if (sp < 0 && i < len) {
            i++;
            continue;
        }
        text tx = {s, i}; /* pre-tokenize + BPE the segment [seg, i) */
        for (size_t p = seg; p < i;) {
            size_t k = pretoken(&tx, p);
            int room = cap - (int)(count < cap ? count : cap);
            int r = bpe(t, s + p, k, sym, out + (count < cap ? count : cap), room);
            if (r < 0 || count + r > 0x7fffffff) {
                count = -1;
                break;
            }
            count += r;
            p += k;
        }
        if (count < 0 || i == len) break;
        if (count < cap) out[count] = sp;
        count++;
        i += sp_len;
        seg = i;
        if (i == len) break;
    }
    free(sym);
    free(buf);
    return (int)count;
}

int mmoe_token_bytes(const mmoe_model *m, int32_t id, char *out, int cap) {
    const mmoe_tokenizer *t = &m->tok;
    if (id < 0 || (uint32_t)id >= m->cfg.vocab_size) return -1;
    if ((uint32_t)id >= t->n_vocab) { /* an id the tokenizer does not cover (random-init models): U+FFFD */
        static const char repl[] = "\xEF\xBF\xBD";
        if (cap < 3) return -1;
        memcpy(out, repl, 3);
        return 3;
    }
    uint32_t o = tok_off(t, (uint32_t)id), e = tok_off(t, (uint32_t)id + 1);
    if ((int)(e - o) > cap) return -1;
    memcpy(out, t->pool + o, e - o);
    return (int)(e - o);
}

int mmoe_token_is_stop(const mmoe_model *m, int32_t id) {
    const mmoe_tokenizer *t = &m->tok;
    if (id == m->cfg.eos_id) return 1;
    for (uint32_t j = 0; j < t->n_special; j++)
        if ((int32_t)mmoe_rd32(t->specials + 8ull * j) == id) return (int)(mmoe_rd32(t->specials + 8ull * j + 4) & 1);
    return 0;
}
