/* mmoe-run: the phone command line.
 *   mmoe-run model.mmoe -p "text" -n 64 -t 4 [--temp 0.8 --top-p 0.95 --seed 1 | --greedy]
 *            [--prompt-ids 1,2,3] [--ids] [--profile] [--float] [--ctx N] [--ignore-eos] [--check]
 * Text goes to stdout; timings (prefill / decode tok/s, peak RSS, kernel set) to stderr.
 * --ids prints the generated token ids (comma separated, one line) instead of text; --prompt-ids skips the
 * tokenizer; --check only loads and validates the file. Exit 0 on success, 1 on bad input/model, 2 on usage. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "mmoe.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(void) {
    fprintf(stderr,
            "usage: mmoe-run MODEL.mmoe [-p PROMPT | --prompt-ids 1,2,3] [-n N] [-t THREADS] [--greedy]\n"
            "                [--temp T] [--top-p P] [--seed S] [--ids] [--profile] [--float] [--ctx N]\n"
            "                [--ignore-eos] [--check]\n");
}

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

static int parse_float(const char *s, const char *what, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "error: %s must be a number, got '%s'\n", what, s);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *prompt = NULL, *prompt_ids = NULL;
    long n_new = 64, threads = 1, seed = 0, max_ctx = 0;
    float temp = 0.8f, top_p = 0.95f;
    int greedy = 0, print_ids = 0, profile = 0, float_path = 0, ignore_eos = 0, check = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV                                                                                                     \
    if (!v) {                                                                                                     \
        fprintf(stderr, "error: %s needs a value\n", a);                                                          \
        return 2;                                                                                                 \
    }                                                                                                             \
    i++;
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { NEEDV prompt = v; }
        else if (!strcmp(a, "--prompt-ids")) { NEEDV prompt_ids = v; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--max-new-tokens")) { NEEDV if (parse_int(v, a, 0, 1 << 20, &n_new)) return 2; }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { NEEDV if (parse_int(v, a, 1, 256, &threads)) return 2; }
        else if (!strcmp(a, "--seed")) { NEEDV if (parse_int(v, a, 0, 0x7fffffffL, &seed)) return 2; }
        else if (!strcmp(a, "--ctx")) { NEEDV if (parse_int(v, a, 1, 1 << 20, &max_ctx)) return 2; }
        else if (!strcmp(a, "--temp")) { NEEDV if (parse_float(v, a, &temp)) return 2; }
        else if (!strcmp(a, "--top-p")) { NEEDV if (parse_float(v, a, &top_p)) return 2; }
        else if (!strcmp(a, "--greedy")) greedy = 1;
        else if (!strcmp(a, "--ids")) print_ids = 1;
        else if (!strcmp(a, "--profile")) profile = 1;
        else if (!strcmp(a, "--float")) float_path = 1;
        else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(a, "--check")) check = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else if (a[0] == '-') { fprintf(stderr, "error: unknown option %s\n", a); usage(); return 2; }
        else if (!model_path) model_path = a;
        else { fprintf(stderr, "error: unexpected argument %s\n", a); return 2; }
#undef NEEDV
    }
    if (!model_path) {
        usage();
        return 2;
    }
    char err[512];
    mmoe_model *m = mmoe_model_open(model_path, err, sizeof err);
    if (!m) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    if (check) {
        printf("ok: %s (%lld layers, d_model %lld, vocab %lld, %lld experts top-%lld)\n", model_path,
               (long long)mmoe_model_info(m, "n_layers"), (long long)mmoe_model_info(m, "d_model"),
               (long long)mmoe_model_info(m, "vocab_size"), (long long)mmoe_model_info(m, "n_experts"),
               (long long)mmoe_model_info(m, "top_k"));
        mmoe_model_close(m);
        return 0;
    }
    int rc = 1;
    int V = (int)mmoe_model_info(m, "vocab_size");
    int32_t *ids = NULL;
    float *logits = NULL;
    int n_prompt = 0;
    mmoe_ctx *c = NULL;
    if (prompt_ids) {
        size_t len = strlen(prompt_ids);
        ids = malloc(sizeof(int32_t) * (len / 2 + 2));
        if (!ids) goto done;
        const char *s = prompt_ids;
        while (*s) {
            char *end;
            errno = 0;
            long v = strtol(s, &end, 10);
            if (errno || end == s || v < 0 || v >= V || (*end && *end != ',')) {
                fprintf(stderr, "error: --prompt-ids: bad token id list at '%s' (ids must be in [0, %d))\n", s, V);
                goto done;
            }
            ids[n_prompt++] = (int32_t)v;
            s = *end ? end + 1 : end;
        }
    } else {
        const char *text = prompt ? prompt : "";
        size_t len = strlen(text);
        ids = malloc(sizeof(int32_t) * (len + 1));
        if (!ids) goto done;
        n_prompt = mmoe_tokenize(m, text, len, ids, (int)len + 1);
        if (n_prompt < 0) {
            fprintf(stderr, "error: the prompt cannot be tokenized (a byte missing from the vocabulary)\n");
            goto done;
        }
    }
    if (n_prompt == 0) {
        fprintf(stderr, "error: empty prompt (give -p TEXT or --prompt-ids)\n");
        goto done;
    }
    c = mmoe_ctx_new(m, (int)threads, (int)(max_ctx ? max_ctx : n_prompt + n_new), float_path ? MMOE_FLOAT_PATH : 0,
                     err, sizeof err);
    if (!c) {
        fprintf(stderr, "error: %s\n", err);
        goto done;
    }
    logits = malloc(sizeof(float) * (size_t)V);
    if (!logits) goto done;
    double t0 = now();
    if (mmoe_eval(c, ids, n_prompt, logits, 0, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        goto done;
    }
    double t_prefill = now() - t0, t_decode = 0.0;
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
    fprintf(stderr, "peak RSS: %.1f MB\n", ru.ru_maxrss / 1024.0);
    if (profile) {
        double s[MMOE_T_COUNT], tot = 0.0;
        mmoe_profile_get(c, s);
        for (int i = 0; i < MMOE_T_COUNT; i++) tot += s[i];
        fprintf(stderr, "profile (prefill + decode):\n");
        for (int i = 0; i < MMOE_T_COUNT; i++)
            fprintf(stderr, "  %-10s %9.3f ms  %5.1f%%\n", mmoe_timer_names[i], 1e3 * s[i], tot > 0 ? 100 * s[i] / tot : 0.0);
    }
    rc = 0;
done:
    free(logits);
    free(ids);
    mmoe_ctx_free(c);
    mmoe_model_close(m);
    return rc;
}
