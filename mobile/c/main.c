/* mmoe-run: the phone command line (mmoe-run --help lists every option with its default).
 * Text goes to stdout; timings (prefill / decode tok/s, peak RSS, kernel set) to stderr.
 * Exit status, as every CLI of the repo (model/cli.py): 0 ok, 2 bad input (a bad option value, a file the
 * loader rejects, a prompt that cannot be run: one line on stderr), 1 an internal failure (out of memory, an
 * engine error mid-run). A prompt is bytes: invalid UTF-8 goes to the byte-level tokenizer as it is, the
 * same rule as `python -m mobile generate`. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "mmoe.h"

enum { EXIT_BAD_INPUT = 2, EXIT_INTERNAL = 1 };
#define N_NEW_MAX (1L << 20)
#define CTX_MAX (1L << 20)
#define THREADS_MAX 256L
#define SEED_MAX 0x7fffffffL
#define BUDGET_MAX_MB (1L << 24)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void help(void) {
    printf("usage: mmoe-run MODEL.mmoe [-p PROMPT | --prompt-ids 1,2,3] [options]\n"
           "\n"
           "Run a .mmoe model with the C engine: prefill the prompt, then generate.\n"
           "\n"
           "  MODEL.mmoe               the model file (validated by the loader before anything runs)\n"
           "  -p, --prompt TEXT        prompt text, passed to the byte-level tokenizer as bytes (default: none)\n"
           "  --prompt-ids IDS         comma-separated token ids in [0, vocab_size), skipping the tokenizer;\n"
           "                           not with -p (default: none)\n"
           "  -n, --max-new-tokens N   tokens to generate, in [1, %ld]; prompt + N must fit the context\n"
           "                           (default: 64)\n"
           "  -t, --threads T          worker threads, in [1, %ld] (default: 1)\n"
           "  --temp T                 sampling temperature, finite and >= 0; 0 = greedy (default: 0.8)\n"
           "  --top-p P                nucleus sampling mass, in (0, 1]; 1 = no filter (default: 0.95)\n"
           "  --seed S                 sampling seed, in [0, %ld] (default: 0)\n"
           "  --greedy                 always take the most likely token (default: off)\n"
           "  --ctx N                  KV cache length, in [1, the model's max_seq_len]\n"
           "                           (default: prompt tokens + N)\n"
           "  --ignore-eos             keep generating past end-of-text / end-of-turn tokens (default: off)\n"
           "  --ids                    print the generated token ids (one comma-separated line) instead of text\n"
           "                           (default: off)\n"
           "  --profile                per-op timers on stderr (default: off)\n"
           "  --float                  debug: dequantized fp32 weights instead of the int kernels (default: off)\n"
           "  --check                  only load and validate the file, print one 'ok:' line (default: off)\n"
           "  --mem-budget MB          run within MB MiB of peak RSS: weights other than the routed experts are\n"
           "                           read into memory, the experts stay in the file and are read on demand\n"
           "                           into an expert cache sized from the budget, in [1, %ld]; a budget below\n"
           "                           the model's minimum is refused, naming it (default: off, all mmapped)\n"
           "  --cache-policy P         expert-cache eviction under --mem-budget: lru, lfu, or pin (each layer's\n"
           "                           most-routed experts of the prompt stay cached) (default: lfu)\n"
           "  --io-threads N           expert-read threads under --mem-budget, in [1, 16] (default: 2)\n"
           "  --prefetch               under --mem-budget, each decode step guesses the next MoE layer's experts\n"
           "                           (its router on the current hidden state) and reads the uncached ones\n"
           "                           into that layer's slots while this layer computes; same outputs\n"
           "                           (default: off)\n"
           "  -h, --help               this help\n"
           "\n"
           "Environment: MMOE_KERNELS=scalar|avx2|neon|dotprod|i8mm forces a kernel set; MMOE_NO_DIRECT=1: no\n"
           "O_DIRECT for expert reads (plain pread + fadvise DONTNEED).\n"
           "Exit status: 0 ok, 2 bad input (one line on stderr), 1 internal error.\n",
           N_NEW_MAX, THREADS_MAX, SEED_MAX, BUDGET_MAX_MB);
}

/* This process's peak RSS in KiB from /proc/self/status, -1 where there is none. */
static long vm_hwm_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

/* Whole-string integer in [lo, hi]: no trailing garbage, no overflow. */
static int parse_int(const char *s, const char *what, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "error: %s must be an integer in [%ld, %ld], got '%s'\n", what, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Whole-string finite number in [lo, hi] (lo excluded when lo_open). */
static int parse_float(const char *s, const char *what, double lo, int lo_open, double hi, const char *range,
                       float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || (lo_open ? v <= lo : v < lo) || v > hi) {
        fprintf(stderr, "error: %s must be a finite number %s, got '%s'\n", what, range, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *prompt = NULL, *prompt_ids = NULL;
    long n_new = 64, threads = 1, seed = 0, max_ctx = 0, budget_mb = 0, io_threads = 2;
    int policy = MMOE_CACHE_LFU; /* the best hit rate measured (bench/results/streaming.md) */
    const char *cache_opt = NULL; /* --cache-policy / --io-threads given: they need --mem-budget */
    float temp = 0.8f, top_p = 0.95f;
    int greedy = 0, print_ids = 0, profile = 0, float_path = 0, ignore_eos = 0, check = 0, prefetch = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV                                                                                                     \
    if (!v) {                                                                                                     \
        fprintf(stderr, "error: %s needs a value (see mmoe-run --help)\n", a);                                    \
        return EXIT_BAD_INPUT;                                                                                    \
    }                                                                                                             \
    i++;
#define BAD(x) \
    if (x) return EXIT_BAD_INPUT;
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { NEEDV prompt = v; }
        else if (!strcmp(a, "--prompt-ids")) { NEEDV prompt_ids = v; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--max-new-tokens")) { NEEDV BAD(parse_int(v, a, 1, N_NEW_MAX, &n_new)) }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { NEEDV BAD(parse_int(v, a, 1, THREADS_MAX, &threads)) }
        else if (!strcmp(a, "--seed")) { NEEDV BAD(parse_int(v, a, 0, SEED_MAX, &seed)) }
        else if (!strcmp(a, "--ctx")) { NEEDV BAD(parse_int(v, a, 1, CTX_MAX, &max_ctx)) }
        else if (!strcmp(a, "--temp")) { NEEDV BAD(parse_float(v, a, 0.0, 0, INFINITY, ">= 0", &temp)) }
        else if (!strcmp(a, "--top-p")) { NEEDV BAD(parse_float(v, a, 0.0, 1, 1.0, "in (0, 1]", &top_p)) }
        else if (!strcmp(a, "--mem-budget")) { NEEDV BAD(parse_int(v, a, 1, BUDGET_MAX_MB, &budget_mb)) }
        else if (!strcmp(a, "--io-threads")) { NEEDV BAD(parse_int(v, a, 1, 16, &io_threads)) cache_opt = a; }
        else if (!strcmp(a, "--cache-policy")) {
            NEEDV policy = -1;
            cache_opt = a;
            for (int k = 0; k < 3; k++)
                if (!strcmp(v, mmoe_cache_policy_names[k])) policy = k;
            if (policy < 0) {
                fprintf(stderr, "error: --cache-policy must be lru, lfu or pin, got '%s'\n", v);
                return EXIT_BAD_INPUT;
            }
        }
        else if (!strcmp(a, "--prefetch")) { prefetch = 1; cache_opt = a; }
        else if (!strcmp(a, "--greedy")) greedy = 1;
        else if (!strcmp(a, "--ids")) print_ids = 1;
        else if (!strcmp(a, "--profile")) profile = 1;
        else if (!strcmp(a, "--float")) float_path = 1;
        else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(a, "--check")) check = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { help(); return 0; }
        else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "error: unknown option %s (see mmoe-run --help)\n", a);
            return EXIT_BAD_INPUT;
        }
        else if (!model_path) model_path = a;
        else {
            fprintf(stderr, "error: unexpected argument '%s' (one model file; see mmoe-run --help)\n", a);
            return EXIT_BAD_INPUT;
        }
#undef BAD
#undef NEEDV
    }
    if (!model_path) {
        fprintf(stderr, "error: no model file given (usage: mmoe-run MODEL.mmoe -p TEXT; see mmoe-run --help)\n");
        return EXIT_BAD_INPUT;
    }
    if (cache_opt && !budget_mb) {
        fprintf(stderr, "error: %s configures the expert cache of --mem-budget: give --mem-budget too\n", cache_opt);
        return EXIT_BAD_INPUT;
    }
    if (prompt && prompt_ids) {
        fprintf(stderr, "error: give -p/--prompt or --prompt-ids, not both\n");
        return EXIT_BAD_INPUT;
    }
    if (!check && !prompt_ids && (!prompt || !*prompt)) {
        fprintf(stderr, "error: empty prompt (give -p TEXT or --prompt-ids 1,2,3)\n");
        return EXIT_BAD_INPUT;
    }
    char err[512];
    mmoe_model *m = budget_mb && !check ? mmoe_model_open_streaming(model_path, err, sizeof err)
                                        : mmoe_model_open(model_path, err, sizeof err);
    if (!m) {
        fprintf(stderr, "error: %s\n", err);
        return EXIT_BAD_INPUT;
    }
    if (check) {
        printf("ok: %s (%lld layers, d_model %lld, vocab %lld, %lld experts top-%lld)\n", model_path,
               (long long)mmoe_model_info(m, "n_layers"), (long long)mmoe_model_info(m, "d_model"),
               (long long)mmoe_model_info(m, "vocab_size"), (long long)mmoe_model_info(m, "n_experts"),
               (long long)mmoe_model_info(m, "top_k"));
        mmoe_model_close(m);
        return 0;
    }
    int rc = EXIT_INTERNAL;
    int V = (int)mmoe_model_info(m, "vocab_size");
    long seq_max = (long)mmoe_model_info(m, "max_seq_len");
    int32_t *ids = NULL;
    float *logits = NULL;
    int n_prompt = 0;
    mmoe_ctx *c = NULL;
    if (prompt_ids) {
        size_t len = strlen(prompt_ids);
        ids = malloc(sizeof(int32_t) * (len / 2 + 2));
        if (!ids) goto oom;
        const char *s = prompt_ids;
        for (;;) { /* id (',' id)*: an empty or trailing entry is an error, as in Python's int('') */
            char *end;
            errno = 0;
            long v = strtol(s, &end, 10);
            if (errno || end == s || v < 0 || v >= V || (*end && *end != ',') || (*end == ',' && !end[1])) {
                fprintf(stderr, "error: --prompt-ids: bad token id list at '%s' (ids in [0, %d) for %s, comma-separated)\n",
                        s, V, model_path);
                rc = EXIT_BAD_INPUT;
                goto done;
            }
            ids[n_prompt++] = (int32_t)v;
            if (!*end) break;
            s = end + 1;
        }
    } else {
        size_t len = strlen(prompt);
        ids = malloc(sizeof(int32_t) * (len + 1));
        if (!ids) goto oom;
        n_prompt = mmoe_tokenize(m, prompt, len, ids, (int)len + 1);
        if (n_prompt <= 0) {
            fprintf(stderr, "error: the prompt cannot be tokenized by %s (%s)\n", model_path,
                    n_prompt < 0 ? "a byte missing from the vocabulary" : "no tokens");
            rc = EXIT_BAD_INPUT;
            goto done;
        }
    }
    if (max_ctx > seq_max) {
        fprintf(stderr, "error: --ctx %ld exceeds the context of %s (%ld tokens)\n", max_ctx, model_path, seq_max);
        rc = EXIT_BAD_INPUT;
        goto done;
    }
    long ctx = max_ctx ? max_ctx : seq_max;
    if (n_prompt + n_new > ctx) { /* checked before prefill, the rule of `python -m mobile generate` */
        fprintf(stderr, "error: the prompt's %d tokens + -n %ld exceed the %s of %s (%ld tokens)\n", n_prompt, n_new,
                max_ctx ? "--ctx" : "context", model_path, ctx);
        rc = EXIT_BAD_INPUT;
        goto done;
    }
    int ctx_len = (int)(max_ctx ? max_ctx : n_prompt + n_new), flags = float_path ? MMOE_FLOAT_PATH : 0;
    if (budget_mb) {
        uint64_t budget = (uint64_t)budget_mb << 20;
        int64_t min = mmoe_min_budget(m, (int)threads, ctx_len, (int)io_threads);
        if ((int64_t)budget < min) { /* bad input: the user asked for less than this model can run in */
            fprintf(stderr, "error: --mem-budget %ld MB is below the minimum for %s with this context and these "
                    "threads: %lld MB\n", budget_mb, model_path, (long long)((min + (1 << 20) - 1) >> 20));
            rc = EXIT_BAD_INPUT;
            goto done;
        }
        c = mmoe_ctx_new_streaming(m, (int)threads, ctx_len, flags, budget, policy, (int)io_threads, err, sizeof err);
        if (c && prefetch) mmoe_ctx_set_prefetch(c, 1);
    } else {
        c = mmoe_ctx_new(m, (int)threads, ctx_len, flags, err, sizeof err);
    }
    if (!c) {
        fprintf(stderr, "error: %s\n", err);
        goto done;
    }
    logits = malloc(sizeof(float) * (size_t)V);
    if (!logits) goto oom;
    double t0 = now();
    if (mmoe_eval(c, ids, n_prompt, logits, 0, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        goto done;
    }
    double t_prefill = now() - t0, t_decode = 0.0;
    uint64_t cs0[MMOE_CS_COUNT]; /* the expert cache after prefill: the decode phase's own figures below */
    int have_cache = mmoe_cache_stats(c, cs0) == 0;
    uint64_t rng = mmoe_rng_seed((uint64_t)seed);
    int n_gen = 0, n_decode = 0;
    char piece[256];
    while (n_gen < n_new) {
        int32_t tok = mmoe_sample(logits, V, greedy ? 0.0f : temp, top_p, &rng);
        if (print_ids) {
            printf(n_gen ? ",%d" : "%d", tok);
        } else {
            int nb = mmoe_token_bytes(m, tok, piece, sizeof piece);
            if (nb > 0) fwrite(piece, 1, (size_t)nb, stdout);
        }
        fflush(stdout);
        n_gen++;
        if ((!ignore_eos && mmoe_token_is_stop(m, tok)) || n_gen == n_new) break;
        t0 = now();
        if (mmoe_eval(c, &tok, 1, logits, 0, err, sizeof err)) {
            fprintf(stderr, "\nerror: %s\n", err);
            goto done;
        }
        t_decode += now() - t0;
        n_decode++;
    }
    printf("\n");
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr, "kernels: %s, threads: %ld\n", mmoe_ctx_kernels(c), threads);
    fprintf(stderr, "prefill: %d tokens in %.3f s, %.1f tok/s\n", n_prompt, t_prefill, n_prompt / (t_prefill > 0 ? t_prefill : 1e-9));
    fprintf(stderr, "decode: %d tokens in %.3f s, %.1f tok/s\n", n_decode, t_decode,
            n_decode / (t_decode > 0 ? t_decode : 1e-9));
    /* VmHWM: ru_maxrss survives exec on Linux, so under a big parent (pytest, make) it reports the parent's */
    long hwm_kb = vm_hwm_kb();
    fprintf(stderr, "peak RSS: %.1f MB%s\n", (hwm_kb >= 0 ? hwm_kb : ru.ru_maxrss) / 1024.0,
            hwm_kb >= 0 ? " (VmHWM)" : "");
    uint64_t cs[MMOE_CS_COUNT];
    if (mmoe_cache_stats(c, cs) == 0) {
        uint64_t uses = cs[MMOE_CS_HITS] + cs[MMOE_CS_MISSES];
        fprintf(stderr, "expert cache: policy %s, %llu slots a layer x %llu layers, budget %.1f MB (min %.1f MB), "
                "resident weights %.1f MB, io %s x %llu\n", mmoe_cache_policy_names[cs[MMOE_CS_POLICY]],
                (unsigned long long)cs[MMOE_CS_SLOTS_PER_LAYER], (unsigned long long)cs[MMOE_CS_MOE_LAYERS],
                cs[MMOE_CS_BUDGET] / 1048576.0, cs[MMOE_CS_MIN_BUDGET] / 1048576.0, cs[MMOE_CS_RESIDENT] / 1048576.0,
                cs[MMOE_CS_DIRECT_IO] ? "O_DIRECT" : "pread+DONTNEED", (unsigned long long)cs[MMOE_CS_IO_THREADS]);
        fprintf(stderr, "expert cache: hits %llu misses %llu (hit rate %.1f%%), evictions %llu, read %.1f MB in "
                "%.3f s of I/O, compute stalled %.3f s\n", (unsigned long long)cs[MMOE_CS_HITS],
                (unsigned long long)cs[MMOE_CS_MISSES], uses ? 100.0 * cs[MMOE_CS_HITS] / uses : 0.0,
                (unsigned long long)cs[MMOE_CS_EVICTIONS], cs[MMOE_CS_BYTES_READ] / 1048576.0,
                cs[MMOE_CS_READ_NS] * 1e-9, cs[MMOE_CS_STALL_NS] * 1e-9);
        if (have_cache) {
            uint64_t h = cs[MMOE_CS_HITS] - cs0[MMOE_CS_HITS], mi = cs[MMOE_CS_MISSES] - cs0[MMOE_CS_MISSES];
            fprintf(stderr, "expert cache, decode only: hits %llu misses %llu (hit rate %.1f%%), read %.1f MB, "
                    "compute stalled %.3f s\n", (unsigned long long)h, (unsigned long long)mi,
                    h + mi ? 100.0 * h / (h + mi) : 0.0,
                    (cs[MMOE_CS_BYTES_READ] - cs0[MMOE_CS_BYTES_READ]) / 1048576.0,
                    (cs[MMOE_CS_STALL_NS] - cs0[MMOE_CS_STALL_NS]) * 1e-9);
        }
        if (cs[MMOE_CS_PREFETCH]) {
            uint64_t is = cs[MMOE_CS_PF_ISSUED];
            fprintf(stderr, "expert cache, prefetch: issued %llu used %llu (accuracy %.1f%%) wasted %llu "
                    "cancelled %llu\n", (unsigned long long)is, (unsigned long long)cs[MMOE_CS_PF_USED],
                    is ? 100.0 * cs[MMOE_CS_PF_USED] / is : 0.0, (unsigned long long)cs[MMOE_CS_PF_WASTED],
                    (unsigned long long)cs[MMOE_CS_PF_CANCELLED]);
        }
    }
    if (profile) {
        double s[MMOE_T_COUNT], tot = 0.0;
        mmoe_profile_get(c, s);
        for (int i = 0; i < MMOE_T_COUNT; i++) tot += s[i];
        fprintf(stderr, "profile (prefill + decode):\n");
        for (int i = 0; i < MMOE_T_COUNT; i++)
            fprintf(stderr, "  %-10s %9.3f ms  %5.1f%%\n", mmoe_timer_names[i], 1e3 * s[i], tot > 0 ? 100 * s[i] / tot : 0.0);
    }
    rc = 0;
    goto done;
oom:
    fprintf(stderr, "error: out of memory\n");
done:
    free(logits);
    free(ids);
    mmoe_ctx_free(c);
    mmoe_model_close(m);
    return rc;
}
