/* What every fuzz harness shares: one-time APR set-up, a pool per input, a
 * reader that splits the input into fields, and FUZZ_CHECK for invariants.
 *
 * A harness is t/fuzz/fuzz_<target>.c with LLVMFuzzerTestOneInput (and
 * LLVMFuzzerInitialize when it needs fixtures); scripts/fuzz.sh builds it
 * against every lib/ source with libFuzzer, ASan and UBSan. */
#ifndef MSO_FUZZ_COMMON_H
#define MSO_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_pools.h>
#include <apr_strings.h>

#include "mso_log.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* "Now" for everything time-dependent, so that an input always does the same. */
#define FUZZ_NOW 1700000000LL

/* An invariant that does not hold: say which and abort, so that libFuzzer
 * keeps the input as a crash. */
#define FUZZ_CHECK(cond, ...)                                                         \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "\nINVARIANT BROKEN %s:%d: %s\n  ", __FILE__, __LINE__,   \
                    #cond);                                                           \
            fprintf(stderr, __VA_ARGS__);                                             \
            fputc('\n', stderr);                                                      \
            abort();                                                                  \
        }                                                                             \
    } while (0)

/* Lives for the process: fixtures made in LLVMFuzzerInitialize. */
static apr_pool_t *fuzz_root;

/* lib/ logs hostile values only quoted and escaped: a control character in a
 * log line is a log-injection bug. */
static inline void fuzz_log_cb(void *baton, const char *file, int line, mso_log_level_e level,
                        apr_status_t rv, const char *msg)
{
    const unsigned char *c;

    (void)baton; (void)file; (void)line; (void)level; (void)rv;
    for (c = (const unsigned char *)msg; *c; c++) {
        FUZZ_CHECK(*c >= 0x20 && *c != 0x7f, "control character 0x%02x in a log line from "
                   "%s:%d", *c, file, line);
    }
}

static inline void fuzz_init(void)
{
    if (fuzz_root) {
        return;
    }
    apr_initialize();
    apr_pool_create(&fuzz_root, NULL);
    /* Every level, so that the debug paths are fuzzed too. */
    mso_log_set(fuzz_log_cb, NULL, MSO_LOG_DEBUG);
}

static inline apr_pool_t *fuzz_pool(void)
{
    apr_pool_t *p;

    fuzz_init();
    apr_pool_create(&p, fuzz_root);
    return p;
}

/* The input, read front to back. */
typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_in_t;

static inline fuzz_in_t fuzz_in(const uint8_t *data, size_t size)
{
    fuzz_in_t in = { data, size };
    return in;
}

/* One byte (0 once the input is used up). */
static inline unsigned fuzz_byte(fuzz_in_t *in)
{
    if (!in->n) {
        return 0;
    }
    in->n--;
    return *in->p++;
}

/* The next field: the bytes up to a NUL (or up to the end), as a string of
 * exactly that size in the pool. C strings cannot hold a NUL, so NUL is the
 * natural separator of fields that are C strings. */
static inline const char *fuzz_str(apr_pool_t *p, fuzz_in_t *in)
{
    const uint8_t *nul = memchr(in->p, 0, in->n);
    size_t len = nul ? (size_t)(nul - in->p) : in->n;
    const char *s = apr_pstrmemdup(p, (const char *)in->p, len);

    in->p += len + (nul ? 1 : 0);
    in->n -= len + (nul ? 1 : 0);
    return s;
}

/* Whatever is left, NULs included, NUL-terminated after *len bytes. */
static inline const char *fuzz_rest(apr_pool_t *p, fuzz_in_t *in, size_t *len)
{
    const char *s = apr_pstrmemdup(p, (const char *)in->p, in->n);

    *len = in->n;
    in->p += in->n;
    in->n = 0;
    return s;
}

/* True when s holds only printable ASCII (space included). */
static inline int fuzz_printable(const char *s)
{
    const unsigned char *c;

    for (c = (const unsigned char *)s; c && *c; c++) {
        if (*c < 0x20 || *c >= 0x7f) {
            return 0;
        }
    }
    return 1;
}

/* MSO_FUZZ_VERBOSE=1: harnesses say what each input came to (to check seeds). */
static inline int fuzz_verbose(void)
{
    static int v = -1;

    if (v < 0) {
        const char *e = getenv("MSO_FUZZ_VERBOSE");
        v = e && *e == '1';
    }
    return v;
}

static inline int fuzz_streq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && !strcmp(a, b));
}

#endif
